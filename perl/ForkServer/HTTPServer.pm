package ForkServer::HTTPServer;
use strict;
use warnings;

# The server object and its options. Its methods live in rooms of one
# concern each, as Starlet keeps Parallel::Prefork apart from its server:
#   ForkServer::HTTPServer::Master    the master process and the Emperor pipe
#   ForkServer::HTTPServer::Worker    a worker's connection loop
#   ForkServer::HTTPServer::Request   a request's head and body
#   ForkServer::HTTPServer::Response  the app, its response, the access log
#   ForkServer::HTTPServer::Counts    requests served, for the Emperor's status
#   ForkServer::HTTPServer::Wire      clock, deadlines, whole reads and writes
#   ForkServer::HTTPServer::Listener  the listening socket
# Everything the master and the workers will ever need is loaded here, at
# `use` time, in the base vassal: an adopted vassal forks with these pages
# already compiled and shared, and run() loads nothing.
use Carp ();
use ForkServer::Log ();
use ForkServer::HTTPServer::Wire ();
use ForkServer::HTTPServer::Listener ();
use ForkServer::HTTPServer::Worker ();
use ForkServer::HTTPServer::Conns ();
use ForkServer::HTTPServer::Master ();
use ForkServer::HTTPServer::Solo ();
use ForkServer::HTTPServer::Kids ();
use ForkServer::HTTPServer::Request ();
use ForkServer::HTTPServer::Response ();
use ForkServer::HTTPServer::Counts ();
use ForkServer::HTTPServer::Writer ();

our $VERSION = '0.01';
our @ISA = qw(ForkServer::HTTPServer::Master ForkServer::HTTPServer::Solo ForkServer::HTTPServer::Kids
              ForkServer::HTTPServer::Worker ForkServer::HTTPServer::Conns
              ForkServer::HTTPServer::Request ForkServer::HTTPServer::Response
              ForkServer::HTTPServer::Counts);

=head2 constant_env() -> LIST

The key/value pairs of the PSGI environment that every request gets.

=cut

sub constant_env { return ForkServer::HTTPServer::Request::constant_env() }

# One line on stderr in the vassal's one format (ForkServer::Log), whatever
# the app did to warn() or STDERR's buffer.
sub _log { ForkServer::Log::line($_[0]{name}, $_[1]) }

sub new {
    my ($class, %args) = @_;
    my $self = bless {
        workers          => 1,
        solo             => 0,        # master = false: one process, no worker forked
        max_requests     => 0,
        harakiri         => 0,
        name             => 'psgi',
        heartbeat        => 0,
        idle             => 0,
        mercy            => 10,
        max_header_size  => 8192,     # buffer-size: the whole request head
        max_body_size    => 0,        # limit-post; 0: no limit
        body_buffer_size => 65536,
        # Deadlines, in seconds. Each phase has a whole deadline (a client
        # that trickles bytes cannot stretch it), and socket_timeout bounds
        # any single stall inside the body and the response.
        header_timeout   => 4,        # from accept (or the first byte after a response) to the end of the head
        body_timeout     => 60,       # the whole request body
        response_timeout => 60,       # the whole response write
        keepalive_timeout => 5,       # an idle keep-alive connection is kept (it holds no worker)
        keepalive_handoff => 1,       # a worker starting a request gives its idle connections away
        desk_dumpable    => 0,        # a worker made not dumpable by dropping root may be so again, for the desk
        stop_grace       => 1,        # a stopping worker waits this long for a request already on its way on an idle connection
        socket_timeout   => 4,        # longest single stall of a read or write (uWSGI's socket-timeout)
        protocol         => 'http',   # or 'uwsgi': requests are uwsgi packets (nginx's uwsgi_pass)
        listen_backlog   => 1024,
        %args,
    }, $class;
    # read_timeout: the name before the deadlines existed
    $self->{socket_timeout} = $args{read_timeout} if defined $args{read_timeout} && !defined $args{socket_timeout};
    $self->{access_log} = \*STDERR unless exists $args{access_log};
    Carp::croak('app is required') unless ref $self->{app} eq 'CODE';
    $self->{workers} = 1 if !$self->{workers} || $self->{workers} < 1;
    Carp::croak("master = false serves with one process: processes = $self->{workers} needs the master")
        if $self->{solo} && $self->{workers} > 1;
    Carp::croak('master = false: the spare\'s preforked worker needs its master')
        if $self->{solo} && $self->{preforked};
    $self->{proctitle} //= "psgi-vassal $self->{name}";
    return $self;
}

1;

__END__

=head1 NAME

ForkServer::HTTPServer - the preforking HTTP/1.1 PSGI server inside a psgi-forkserver vassal

=head1 SYNOPSIS

    use ForkServer::HTTPServer;
    ForkServer::HTTPServer->new(
        listen_sock  => $sock,          # or host => '127.0.0.1', port => 9101
        app          => $psgi_app,
        workers      => 2,
        max_requests => 0,
        harakiri     => 0,
        name         => 'app1',
        emperor_fh   => $pipe,          # or undef
        config_fh    => $config_pipe,   # or undef: kept by the master, closed in workers
        heartbeat    => 0,
        idle         => 0,
        access_log   => \*STDERR,       # undef: none
        access_log_path => undef,       # reopened on reload
        proctitle    => 'psgi-vassal app1',
        mercy        => 10,
    )->run;                             # returns once stopped

=head1 DESCRIPTION

A master process and C<workers> prefork worker processes sharing one
listening socket. The app is loaded before C<run()>; C<run()> only forks,
so a vassal goes from C<run()> to its first C<accept()> in a few
milliseconds and every module it needs is loaded at C<use> time.

Workers speak HTTP/1.1: keep-alive (default in HTTP/1.1, opt-in with
C<Connection: keep-alive> in HTTP/1.0), chunked request bodies, chunked
responses when the app gives no length and the body is not an array,
C<Expect: 100-continue>, C<HEAD>. Request bodies up to C<body_buffer_size>
are kept in memory, larger ones go to an anonymous temporary file; in both
cases C<psgi.input> is seekable and C<psgix.input.buffered> is true.
Malformed requests get 400, a head larger than C<max_header_size> 431, a
body larger than C<max_body_size> 413, an HTTP version other than 1.x 505.

Each worker holds many connections (up to 512) and waits for all of them,
and for the listener, in one C<select()>: only a complete request head
makes it busy. Idle keep-alive connections and heads still arriving cost no
worker, so slow clients and many keep-alive clients cannot starve others;
ready connections are served one request each in turn.

The environment has C<psgi.streaming> (delayed responses and writers),
C<psgix.harakiri> (set C<psgix.harakiri.commit> to end the worker after the
response), C<psgix.cleanup> (handlers pushed on C<psgix.cleanup.handlers>
run after the response is sent, before the next request), C<psgix.informational>
and C<psgix.io>; C<psgi.multiprocess> is
true and C<psgi.nonblocking> false.

=head1 MODULES

The server object's methods are kept by concern:
L<ForkServer::HTTPServer::Master> (the master process, its workers and the
Emperor pipe), L<ForkServer::HTTPServer::Listener> (the listening socket),
L<ForkServer::HTTPServer::Worker> (a worker's connection loop),
L<ForkServer::HTTPServer::Request> (a request's head and body),
L<ForkServer::HTTPServer::Response> (the app, its response, the access log),
L<ForkServer::HTTPServer::Counts> (requests served, for the Emperor's status),
L<ForkServer::HTTPServer::Writer> (a streaming response's writer) and
L<ForkServer::HTTPServer::Wire> (clock, deadlines, whole reads and writes).

=head1 CONSTRUCTOR OPTIONS

=over

=item listen_sock, or host and port

A bound, listening socket; or where to bind one (backlog C<listen_backlog>,
default 1024).

=item protocol

C<http> (default), or C<uwsgi> (the vassal's C<socket> key): each
connection carries one request, a uwsgi packet of CGI variables
(L<ForkServer::HTTPServer::UwsgiRequest>) and its body; the response is HTTP, never
chunked, ended by closing the connection, as nginx's C<uwsgi_pass> reads
it. A listener may be a UNIX socket either way.

=item app

The PSGI application (code reference). Required.

=item workers

Number of prefork workers (default 1). A worker that dies is respawned; one
that dies within a second of its birth three times in a row is respawned
with a growing delay (up to 5 s).

=item solo

False by default. True (C<master = false>): no master and no worker; the
one process serves the connections itself and keeps the master's duties
(L<ForkServer::HTTPServer::Solo>). Needs C<workers> 1.

=item max_requests

Recycle a worker after that many requests (0: never).

=item harakiri

Kill a worker that spends more than that many seconds on one request, and
log the request on STDERR. The worker's own C<alarm> does it, so a worker
stuck inside one long XS call is only caught when the call returns.

=item name, proctitle

The vassal's name (access log, messages); the master's process title,
workers get C<"PROCTITLE worker N">.

=item emperor_fh, heartbeat, idle

The Emperor pipe and its duties (PROTOCOL.md section 5): byte 5 when the
first worker accepts, 17 once all accept, 26 every C<heartbeat>/2 seconds,
22 once after C<idle> seconds without a request. Received: 0 stop now, 1
graceful reload, 2 graceful stop; end of file is a graceful stop too.

=item config_fh

The config pipe, if the vassal keeps it: like the Emperor pipe, the
master's alone (workers close both).

=item access_log, access_log_path

A file handle for the access log, one line per request (refused ones too)
in combined log format with the vassal's name as first field and the time
taken as last (seconds, from the request's first byte to its response's
last): C<NAME ADDR - USER [TIME] "METHOD URI PROTOCOL" STATUS BYTES
"REFERER" "USER-AGENT" SECONDS>; a client's quotes, backslashes and control
bytes are escaped C<\xHH>. Default STDERR; C<undef>: no log. With
C<access_log_path>, each reload opens that file again (for appending) for
the new workers, so a rotated log is let go of.

=item mercy

Seconds a graceful stop waits for in-flight requests before SIGKILL.

=item max_header_size, max_body_size, body_buffer_size

Limits: 8192, 0 (no limit) and 65536 bytes by default.

=item stop_grace

Seconds a stopping or recycling worker waits for a request already on its
way on an idle keep-alive connection (1). A recycling worker (max_requests,
C<psgix.harakiri.commit>) is replaced as soon as it stops accepting.

=item header_timeout, body_timeout, response_timeout, socket_timeout, keepalive_timeout

Whole deadlines, in seconds: the request head (4, from accept or from the
first byte after a response; 408 for a partial head), the request body (60),
the response write once the client stops keeping up (60); the longest
single stalled read or write (4; C<read_timeout> is its old name); an idle
keep-alive connection (5).

=item keepalive_handoff

True by default: a worker with siblings that starts a request lists its
other connections on the workers' desk (L<ForkServer::HTTPServer::Desk>);
once the request has run 1 ms with the worker asleep in the app (5 ms with
it running) a free worker takes those on which a request waits, so such a
request does not wait for the busy worker. Where the desk
cannot be had, the worker gives its idle connections to the workers' shared
queue instead (L<ForkServer::HTTPServer::Handoff>). False: a worker keeps
what it accepted.

=item desk_dumpable

False by default. True: the process dropped root before the workers were
forked, which made it not dumpable, and a worker that holds no privilege
(L<ForkServer::Process::Dumpable/restore_unprivileged>) is made dumpable
again so that its siblings may take its connections at the desk. What
that exposes, and to whom: F<docs/security.md>.

=item server_ready

A code reference called once in the master when it listens, with
C<{ host, port, server_software }> (as Plack handlers do).

=back

=head1 SIGNALS

Master: SIGHUP graceful reload; SIGTERM graceful stop; SIGINT and SIGQUIT
stop now. The master tells workers to stop by closing their generation's
stop pipe, never with a signal, so the app's blocking calls are not
interrupted; a worker then finishes its request (with C<Connection: close>),
answers requests already on their way on its idle connections (waiting up
to 1 s for them), and exits. A SIGTERM sent to a worker does the same (its
handler has C<SA_RESTART>). A worker that dies in a request is respawned at
once; one that dies before it ever accepted, three times in a row within a
second of its birth, with a growing delay (up to 5 s). When the Emperor pipe
reaches end of file without a stop request (the Emperor died), a master that
leads its session stops every other process in it before exiting.

=cut
