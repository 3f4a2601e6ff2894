package ForkServer::Base::Warmup;
use strict;
use warnings;

use Plack::Util ();
use ForkServer::HTTPServer ();
use Time::HiRes ();

=head1 NAME

ForkServer::Base::Warmup - call the preloaded app once per path before the base serves adoptions

=head1 SYNOPSIS

  ForkServer::Base::Warmup::run($app, ['/', '/login?next=/'], sub { log_line(@_) });

  my $env    = ForkServer::Base::Warmup::env_for('/search?q=x');  # the synthetic PSGI env
  my $status = ForkServer::Base::Warmup::request($app, '/');       # dies if the app dies

=head1 DESCRIPTION

The C<early-warmup> option of a base vassal. An app builds much of its state
lazily, on its first request: compiled templates, time-zone objects, caches.
In a vassal forked from the base, that first request then builds it again in
every worker, a dozen milliseconds and megabytes of private pages each. Done
once in the base, before it forks anything, the state is shared by every
adopted vassal, copy-on-write.

Each path gets one C<GET> with a synthetic environment shaped like one of
L<ForkServer::HTTPServer>'s: C<SERVER_NAME> C<localhost>, port 80, HTTP/1.1,
from 127.0.0.1, an empty C<psgi.input>, C<psgi.errors> on STDERR,
C<psgi.streaming> true and C<psgi.nonblocking> false (no C<psgix.io>, no
C<psgix.harakiri>: there is no connection and no worker). The whole response
is consumed: an array or filehandle body, a delayed response, a streaming
one (its writer discards what it is given).

Choose paths that build state, not connections: a database handle or a
socket the app opens during the warm-up would be inherited by every vassal,
all of them then talking over the same connection.

One log line per path: its status and the time taken; or, if the app dies
(or returns something that is not a PSGI response), the error. A failed
warm-up is not fatal: the base goes on to serve.

=cut

=head2 run($app, \@paths, $log)

Warm up every path in order; C<$log> gets one line per path.

=cut

sub run {
    my ($app, $paths, $log) = @_;
    for my $path (@$paths) {
        my $t0 = Time::HiRes::time();
        my $status = eval { request($app, $path) };
        my $ms = sprintf '%.1f', (Time::HiRes::time() - $t0) * 1000;
        if (defined $status) {
            $log->("early-warmup GET $path: status $status in $ms ms");
            next;
        }
        (my $err = $@ || 'unknown error') =~ s/\s+\z//;
        $err =~ s/\s*\n\s*/ /g;    # one line
        $log->("early-warmup GET $path failed after $ms ms (going on): $err");
    }
    return;
}

=head2 env_for($path) -> \%env

C<$path> is what would follow C<GET> on a request line: a path, maybe with a
query string.

=cut

sub env_for {
    my ($path) = @_;
    my ($p, $query) = split /\?/, $path, 2;
    (my $path_info = $p) =~ s/%([0-9A-Fa-f]{2})/chr hex $1/eg;
    open my $input, '<', \(my $empty = '') or die "empty psgi.input: $!\n";
    return {
        REQUEST_METHOD      => 'GET',
        REQUEST_URI         => $path,
        SCRIPT_NAME         => '',
        PATH_INFO           => $path_info,
        QUERY_STRING        => $query // '',
        SERVER_NAME         => 'localhost',
        SERVER_PORT         => 80,
        SERVER_PROTOCOL     => 'HTTP/1.1',
        HTTP_HOST           => 'localhost',
        REMOTE_ADDR         => '127.0.0.1',
        REMOTE_PORT         => 0,
        ForkServer::HTTPServer::constant_env(),
        'psgi.input'        => $input,
    };
}

=head2 request($app, $path) -> $status

One request, its response consumed. Dies with the app, or if the response
is not one.

=cut

sub request {
    my ($app, $path) = @_;
    my $res = $app->(env_for($path));
    return _consume($res) if ref $res eq 'ARRAY';
    die 'the app returned ' . (ref $res || (defined $res ? "'$res'" : 'undef')) . ", not a response\n"
        unless ref $res eq 'CODE';
    my $status;
    # psgi.nonblocking is false: the app must respond before this returns
    $res->(sub {
        my ($head) = @_;
        die "a delayed response that is not an array reference\n" unless ref $head eq 'ARRAY';
        $status = _consume($head);
        return if @$head > 2;    # a body: done
        return Plack::Util::inline_object(
            write   => sub { },    # discarded: only what the app builds matters
            close   => sub { },
        );
    });
    die "the delayed response was never started\n" unless defined $status;
    return $status;
}

# The status, with the body (if any) read to its end and closed.
sub _consume {
    my ($res) = @_;
    my ($status, undef, $body) = @$res;
    die "a response without a status\n" unless defined $status;
    Plack::Util::foreach($body, sub { }) if defined $body;
    return $status;
}

1;
