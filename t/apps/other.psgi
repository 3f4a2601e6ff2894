# A second app, loaded on top of the preloaded one by an adopted vassal's `psgi`.
use strict;
use warnings;
sub {
    my $body = "pid=$$ app=other APP_NAME=" . ($ENV{APP_NAME} // '') . "\n";
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
