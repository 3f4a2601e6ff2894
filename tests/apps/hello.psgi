# A tiny PSGI app for the Emperor tests: tells who answers.
use strict;
use warnings;
my $app = sub {
    my $env = shift;
    my $name = $ENV{APP_NAME} // '-';
    my $value = $ENV{APP_VALUE} // '-';
    return [200, ['Content-Type' => 'text/plain'], ["name=$name value=$value pid=$$\n"]];
};
$app;
