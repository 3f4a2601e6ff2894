# The front door tests' app: who answers, and what nginx told it.
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my %h = (
        name  => $ENV{APP_NAME} // '-',
        value => $ENV{APP_VALUE} // '-',
        pid   => $$,
        host  => $env->{HTTP_HOST} // '-',
        xff   => $env->{HTTP_X_FORWARDED_FOR} // '-',
        xproto => $env->{HTTP_X_FORWARDED_PROTO} // '-',
        xhost => $env->{HTTP_X_FORWARDED_HOST} // '-',
    );
    return [200, ['Content-Type' => 'text/plain'], [join(' ', map { "$_=$h{$_}" } sort keys %h) . "\n"]];
};
$app;
