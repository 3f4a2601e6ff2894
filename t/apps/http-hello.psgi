# hello world, for the throughput comparison with Starman
sub { [200, ['Content-Type' => 'text/plain'], ['Hello, World!']] };
