# An app that leaves processes behind (robustness tests).
# GET /spawn?SECONDS double-forks a `sleep SECONDS` (the Emperor, as
# subreaper, inherits it) and answers its pid: a helper, in the vassal's
# session. GET /spawn?SECONDS&setsid does the same in a session of its own:
# a daemon, which the Emperor cannot attribute to the vassal.
use strict;
use warnings;
use POSIX ();
my $app = sub {
    my $env = shift;
    my $name = $ENV{APP_NAME} // '-';
    if ($env->{PATH_INFO} eq '/spawn') {
        my $query = $env->{QUERY_STRING} // '';
        my ($secs) = $query =~ /(\d+)/;
        $secs ||= 300;
        my $own_session = $query =~ /\bsetsid\b/;
        pipe(my $r, my $w) or die "pipe: $!";
        my $child = fork // die "fork: $!";
        if (!$child) {
            close $r;
            POSIX::setsid() if $own_session;
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
