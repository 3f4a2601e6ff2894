# The front door tests' app: who answers, and what nginx told it.
# /cookies answers a head of about 5 KB (two 2.5 KB cookies); a POST is
# read whole and its length answered.
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my @head = ('Content-Type' => 'text/plain');
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
