package EnvInSubAtLoad;
# Preloaded by tests/test_prove.py: reads %ENV inside a sub, but calls it
# as it loads (as Mojo::IOLoop builds its reactor from MOJO_REACTOR), so a
# test that sets the variable before `use EnvInSubAtLoad` must run cold.
use strict;
use warnings;
sub detect { return $ENV{ENV_IN_SUB_AT_LOAD} || 'default' }
our $MODE = detect();
1;
