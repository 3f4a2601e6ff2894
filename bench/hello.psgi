# The smallest app: measures the server, not the app.
my $body = "Hello, World!\n";
sub { [200, ['Content-Type' => 'text/plain', 'Content-Length' => length $body], [$body]] };
