# Answers with the working directory the vassal runs in.
use strict;
use warnings;
use Cwd ();
sub {
    my $body = "cwd=" . Cwd::getcwd() . "\n";
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
