use strict;
use warnings;
use lib "tests/prove_suite/lib";
# %ENV set before `use` of a module the base has preloaded: it must see it
BEGIN { $ENV{ENV_AT_LOAD_MODE} = 'from-the-test' }
use EnvAtLoad;
use Test::More tests => 1;
is $EnvAtLoad::MODE, 'from-the-test', 'the module read %ENV as the test set it';
