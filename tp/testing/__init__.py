"""The test harness: CPU worker pools, the collective counter, ``tp.verify``, the census and the
tiny models the tests and the CLI build."""
