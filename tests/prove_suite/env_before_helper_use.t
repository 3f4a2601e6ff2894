use strict;
use warnings;
use Test::More tests => 1;
use lib "tests/prove_suite/lib";
# %ENV set before `use` of a helper module of the suite's (not preloaded)
# that itself uses a module the base has preloaded, which reads the variable
# as it loads (as Params-Validate's t/02-noop.t and its t/lib/PVTests/Standard.pm)
BEGIN { $ENV{ENV_AT_LOAD_MODE} = 'through-a-helper' }
use UsesEnvAtLoad;
is $EnvAtLoad::MODE, 'through-a-helper', 'the module, loaded by a helper, read %ENV as the test set it';
