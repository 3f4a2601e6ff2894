# hello world, but /slow takes 100 ms (a slow route among fast ones).
use strict;
use warnings;
use Time::HiRes ();
my $body = "Hello, World!\n";
sub {
    my $env = shift;
    Time::HiRes::sleep(0.1) if $env->{PATH_INFO} eq '/slow';
    [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
