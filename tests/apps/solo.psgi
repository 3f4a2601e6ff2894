# A test app for `master = false` vassals: who answers (pid and parent),
# and a request that outlives harakiri.
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my $name = $ENV{APP_NAME} // '-';
    if ($env->{PATH_INFO} eq '/stuck') {
        # stands in for a call stuck inside XS: SIGALRM cannot reach Perl
        require POSIX;
        POSIX::sigprocmask(POSIX::SIG_BLOCK(), POSIX::SigSet->new(POSIX::SIGALRM()));
        select(undef, undef, undef, 0.05) for 1 .. 200;
    }
    if ($env->{PATH_INFO} eq '/sleep') {
        my ($seconds) = ($env->{QUERY_STRING} // '') =~ /(\d+)/;
        select(undef, undef, undef, $seconds // 5);
    }
    return [200, ['Content-Type' => 'text/plain'],
            ["name=$name value=" . ($ENV{APP_VALUE} // '-') . " pid=$$ ppid=" . getppid() . "\n"]];
};
$app;
