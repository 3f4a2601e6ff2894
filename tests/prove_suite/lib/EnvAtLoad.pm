package EnvAtLoad;
# Preloaded by tests/test_prove.py: reads %ENV and calls time() as it
# compiles, so a test that changes either before `use EnvAtLoad` must get
# a fresh compile (run cold), as under prove.
use strict;
use warnings;
our $MODE = $ENV{ENV_AT_LOAD_MODE} // 'default';
sub now { return time }
1;
