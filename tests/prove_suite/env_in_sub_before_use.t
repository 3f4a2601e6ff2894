use strict;
use warnings;
use lib "tests/prove_suite/lib";
# %ENV set before `use` of a preloaded module that reads it in a sub it
# calls while loading: the module must see the test's value
BEGIN { $ENV{ENV_IN_SUB_AT_LOAD} = 'from-the-test' }
use EnvInSubAtLoad;
use Test::More tests => 1;
is $EnvInSubAtLoad::MODE, 'from-the-test', 'the module read %ENV as the test set it';
