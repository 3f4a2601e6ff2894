# A hostile tenant's app: it takes what it can of what tenants share.
#   /fork?max=N    forks children that hold a pid each (until fork fails or N
#                  of them; each ends when this process ends or at /release,
#                  and after 60 s at the latest), answers how many it got
#   /release       ends them
#   /flood?lines=N writes N lines of 100 bytes to its output, as fast as it can
#   /again         asks the Emperor for its replacement (byte 22)
#   /say?word=W    writes one line, "said W"
use strict;
use warnings;
use POSIX ();

my ($hold_r, $hold_w, @held);

sub _release {
    close $hold_w if $hold_w;
    undef $hold_w;
    waitpid($_, 0) for @held;
    @held = ();
}

my $app = sub {
    my ($env) = @_;
    my $path = $env->{PATH_INFO};
    my %q = map { split /=/, $_, 2 } split /&/, $env->{QUERY_STRING} // '';
    my $out = "pid=$$ name=" . ($ENV{APP_NAME} // '-');
    if ($path eq '/fork') {
        _release();
        pipe($hold_r, $hold_w) or die "pipe: $!\n";
        my ($got, $why) = (0, 'max');
        while ($got < ($q{max} // 10)) {
            my $pid = fork;
            if (!defined $pid) { $why = "$!"; last }
            if (!$pid) {
                close $hold_w;
                alarm 60;
                sysread $hold_r, my $buf, 1;    # end of file: released
                POSIX::_exit(0);
            }
            push @held, $pid;
            $got++;
        }
        close $hold_r;
        $out .= " forked=$got stopped=" . ($why =~ s/\s+/_/gr);
    }
    elsif ($path eq '/release') {
        _release();
    }
    elsif ($path eq '/flood') {
        my $line = ('x' x 90) . "\n";
        for my $i (1 .. ($q{lines} // 1000)) {
            syswrite STDERR, sprintf("%08d %s", $i, $line);
        }
    }
    elsif ($path eq '/say') {
        syswrite STDERR, "said $q{word}\n";
    }
    elsif ($path eq '/again') {
        POSIX::write($ENV{UWSGI_EMPEROR_FD}, chr(22), 1) // die "byte 22: $!\n";
    }
    return [200, ['Content-Type' => 'text/plain'], ["$out\n"]];
};
$app;
