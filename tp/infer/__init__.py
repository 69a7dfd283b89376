"""Plans for models no family claims: the traced dataflow, the units inferred from it, the
tiny twin it is traced on, and transformers' own plans as a second opinion."""
