# Answers with its pid and the vassal's APP_NAME (set by `env` in the vassal config).
use strict;
use warnings;
my $loaded_in = $$;
sub {
    my $env = shift;
    my $body = "pid=$$ loaded_in=$loaded_in app=hello APP_NAME=" . ($ENV{APP_NAME} // '') . "\n";
    return [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]];
};
