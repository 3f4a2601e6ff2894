package EnvAtLoad;
# Preloaded by tests/test_prove.py: reads %ENV and calls time() as it
# compiles, so a test that changes either before `use EnvAtLoad` must get
# a fresh compile (run cold), as under prove.
use strict;
use warnings;
our $MODE = $ENV{ENV_AT_LOAD_MODE} // 'default';
# read inside a block, as JSON.pm reads PERL_JSON_BACKEND: still as it compiles
our $BLOCK_MODE;
unless (defined $BLOCK_MODE) {
    $BLOCK_MODE = $ENV{ENV_AT_LOAD_BLOCK} // 'default';
}
# a module that may be there, looked for as it compiles (as Sub::Defer
# looks for Sub::Util): a test may pretend it is loaded before `use`
our $HAS_OPTIONAL = eval { require EnvAtLoadOptional; 1 } ? 1 : 0;
sub now { return time }
1;
