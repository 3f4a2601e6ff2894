# What Plack's own t/ loads, preloaded (without imports) by the benchmark's
# `emperor prove` run of that suite.
use strict;
use warnings;
use Test::More ();
use Plack ();
use Plack::Util ();
use Plack::Test ();
use Plack::Test::MockHTTP ();
use Plack::Builder ();
use Plack::Request ();
use Plack::Response ();
use Plack::Middleware ();
use Plack::Loader ();
use Plack::Runner ();
use HTTP::Message::PSGI ();
use HTTP::Request ();
use HTTP::Response ();
use HTTP::Request::Common ();
use HTTP::Headers ();
use LWP::UserAgent ();
use Test::Requires ();
# not Test::TCP: Test::SharedFork starts Test2 as it loads, which a base must not
use Try::Tiny ();
use URI ();
use Hash::MultiValue ();
1;
