use strict;
use warnings;
use lib "tests/prove_suite/lib";
# %INC changed before `use` of a preloaded module (a module pretended
# loaded, as Sub-Quote's tests do): the module, compiling, must see it
BEGIN { $INC{'EnvAtLoadOptional.pm'} = __FILE__ }
use EnvAtLoad;
use Test::More tests => 1;
is $EnvAtLoad::HAS_OPTIONAL, 1, 'the module found the optional one loaded';
