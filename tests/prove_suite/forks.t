use strict;
use POSIX ();
use warnings;
use Test::More tests => 3;
# its own child, waited for: the status is the child's
my $pid = fork // die "fork: $!";
POSIX::_exit(7) if $pid == 0;
is waitpid($pid, 0), $pid, 'waitpid finds the child';
is $? >> 8, 7, 'and its exit status';
# a child never waited for, which outlives the test by a little: it waits
# until its parent is gone, writes its pid and exits (the harness reaps it)
my $out = $ENV{PROVE_SUITE_OUT};
my $orphan = fork // die "fork: $!";
if ($orphan == 0) {
    my $parent = getppid;
    close STDOUT; close STDERR;
    for (1 .. 2000) { last if getppid != $parent; select undef, undef, undef, 0.005 }
    if ($out && open my $fh, '>', "$out/orphan.tmp") {
        print $fh "$$\n";
        close $fh;
        rename "$out/orphan.tmp", "$out/orphan";
    }
    POSIX::_exit(0);
}
ok $orphan, 'left a child behind';
