use strict;
use warnings;
# the test is another file, run by `do` (as Sub-Quote's quotify-no-hex.t
# runs quotify.t with an option): what that file sets before its `use` of
# a preloaded module counts as the test's own
do './tests/prove_suite/lib/env_then_use.pl' or die $@ || $!;
