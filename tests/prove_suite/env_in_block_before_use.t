use strict;
use warnings;
use lib "tests/prove_suite/lib";
# %ENV set before `use` of a preloaded module that reads it inside a block
# of its top level (not a sub): read as it compiles, so it must see it
BEGIN { $ENV{ENV_AT_LOAD_BLOCK} = 'from-the-test' }
use EnvAtLoad;
use Test::More tests => 1;
is $EnvAtLoad::BLOCK_MODE, 'from-the-test', 'the module read %ENV as the test set it';
