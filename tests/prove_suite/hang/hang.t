use strict;
use warnings;
# Hangs (with a child that hangs too) until the harness kills it; writes
# both pids for test_prove.py to check they are gone.
$| = 1;
print "1..1\nok 1 - started\n";
my $child = fork // die "fork: $!";
if ($child == 0) { select undef, undef, undef, 1 while 1 }
if (my $out = $ENV{PROVE_SUITE_OUT}) {
    open my $fh, '>', "$out/hang.tmp" or die $!;
    print $fh "$$ $child\n";
    close $fh;
    rename "$out/hang.tmp", "$out/hang" or die $!;
}
select undef, undef, undef, 1 while 1;
