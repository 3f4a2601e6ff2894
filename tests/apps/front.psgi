# The front door tests' app: who answers, and what nginx told it.
# /cookies answers a head of about 5 KB (two 2.5 KB cookies); a POST is
# read whole and its length answered. /block waits for a file (a slow
# request whose end the test decides).
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my @head = ('Content-Type' => 'text/plain');
    if ($env->{PATH_INFO} eq '/block') {
        # holds its worker until the test creates $GATE_DIR/go (60 s at most)
        my $dir = $ENV{GATE_DIR};
        if (open(my $fh, '>', "$dir/started")) { close $fh }
        my $until = time + 60;
        select(undef, undef, undef, 0.01) until -e "$dir/go" || time > $until;
    }
    if ($env->{PATH_INFO} eq '/cookies') {
        push @head, 'Set-Cookie' => "a=" . ('x' x 2500), 'Set-Cookie' => "b=" . ('y' x 2500);
    }
    my $posted = 0;
    if ($env->{REQUEST_METHOD} eq 'POST') {
        while ($env->{'psgi.input'}->read(my $buf, 65536)) { $posted += length $buf }
    }
    my %h = (
        name  => $ENV{APP_NAME} // '-',
        value => $ENV{APP_VALUE} // '-',
        pid   => $$,
        host  => $env->{HTTP_HOST} // '-',
        xff   => $env->{HTTP_X_FORWARDED_FOR} // '-',
        xproto => $env->{HTTP_X_FORWARDED_PROTO} // '-',
        xhost => $env->{HTTP_X_FORWARDED_HOST} // '-',
        remote => ($env->{REMOTE_ADDR} // '') eq '' ? '-' : $env->{REMOTE_ADDR},
        posted => $posted,
    );
    return [200, \@head, [join(' ', map { "$_=$h{$_}" } sort keys %h) . "\n"]];
};
$app;
