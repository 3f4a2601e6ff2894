use strict;
use warnings;
use Test::More tests => 1;
# Writes its first draw for test_prove.py to compare with srand_a.t's.
my $out = $ENV{PROVE_SUITE_OUT};
SKIP: {
    skip 'PROVE_SUITE_OUT not set', 1 unless $out;
    open my $fh, '>', "$out/srand_b" or die "$out/srand_b: $!";
    print $fh rand(), "\n";
    ok close $fh, 'first draw written';
}
