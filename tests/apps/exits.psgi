# An app whose worker exits in the middle of a request to /exit (a crash:
# the client's connection closes with no answer); any other path answers.
use strict;
use warnings;
use POSIX ();
my $app = sub {
    my $env = shift;
    POSIX::_exit(3) if $env->{PATH_INFO} eq '/exit';
    return [200, ['Content-Type' => 'text/plain'], ["alive $$\n"]];
};
$app;
