# An example PSGI app on a "codebase" big enough for preloading to pay:
# an object system, a template engine, dates and time zones, JSON. The base
# vassal loads it once; every adopted vassal serves it from shared memory.
use strict;
use warnings;

use Moose ();
use DateTime;
use DateTime::TimeZone;
use Template;
use JSON::XS ();
use HTTP::Message ();
use Try::Tiny ();

package MyApp::Greeting {
    use Moose;
    has app  => (is => 'ro', isa => 'Str', required => 1);
    has zone => (is => 'ro', isa => 'Str', default => 'UTC');
    sub text {
        my ($self) = @_;
        my $now = DateTime->now(time_zone => $self->zone);
        return sprintf "hello from %s (pid %d) at %s\n", $self->app, $$, $now->iso8601;
    }
    __PACKAGE__->meta->make_immutable;
}

# Real codebases load their data at start-up too: every time zone, once, in
# the base, instead of once per worker on its first request.
DateTime::TimeZone->new(name => $_) for DateTime::TimeZone->all_names;

my $json = JSON::XS->new->canonical;

my $app = sub {
    my ($env) = @_;
    my $name = $ENV{APP_NAME} // 'unnamed';
    if ($env->{PATH_INFO} eq '/json') {
        my $body = $json->encode({ app => $name, pid => $$ });
        return [200, ['Content-Type' => 'application/json'], [$body]];
    }
    my $greeting = MyApp::Greeting->new(app => $name, zone => $ENV{APP_TZ} // 'UTC');
    return [200, ['Content-Type' => 'text/plain'], [$greeting->text]];
};

$app;
