# An app that leaves processes behind (robustness tests).
# GET /spawn?SECONDS double-forks a `sleep SECONDS` in its own session (a
# daemon: the Emperor, as subreaper, inherits it) and answers its pid.
use strict;
use warnings;
use POSIX ();
my $app = sub {
    my $env = shift;
    my $name = $ENV{APP_NAME} // '-';
    if ($env->{PATH_INFO} eq '/spawn') {
        my ($secs) = ($env->{QUERY_STRING} // '') =~ /(\d+)/;
        $secs ||= 300;
        pipe(my $r, my $w) or die "pipe: $!";
        my $child = fork // die "fork: $!";
        if (!$child) {
            close $r;
            POSIX::setsid();
            my $gc = fork;
            if (defined $gc && !$gc) {
                close $w;
                exec 'sleep', $secs;
                POSIX::_exit(127);
            }
            syswrite $w, ($gc // 0) . "\n";
            POSIX::_exit(0);
        }
        close $w;
        my $gc = <$r>;
        chomp $gc;
        waitpid $child, 0;
        return [200, ['Content-Type' => 'text/plain'], ["name=$name daemon=$gc pid=$$\n"]];
    }
    return [200, ['Content-Type' => 'text/plain'], ["name=$name value=- pid=$$\n"]];
};
$app;
