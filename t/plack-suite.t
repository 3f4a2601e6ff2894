use strict;
use warnings;
use Test::More;
use Plack::Test::Suite;

# The whole Plack server conformance suite against Plack::Handler::ForkServer
# (real server process, real socket on 127.0.0.1, via Test::TCP).
Plack::Test::Suite->run_server_tests('ForkServer', undef, undef, workers => 2);
done_testing;
