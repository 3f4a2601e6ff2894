use strict;
use warnings;
# The variable is set at run time, then the real test is another file run
# by `require` (as DBI's generated t/zvp_*.t set DBI_PUREPERL and require
# t/NNname.t): that file compiles, and its `use` loads the module, only
# when the `require` runs, after the assignment.
$ENV{ENV_AT_LOAD_MODE} = 'set-before-the-require';
require './tests/prove_suite/lib/uses_env_at_load.pl';
