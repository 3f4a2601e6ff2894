# Preloaded by tests/test_prove.py into the base of `emperor prove`: it
# draws from rand (so a fork that did not reseed would share the sequence)
# and leaves a variable in %ENV (which a test must not see).
use strict;
use warnings;
my $draw = rand;
$ENV{EMPEROR_PROVE_PRELOAD_LEAK} = 1;
$main::PRELOADED = 1;
1;
