package ForkServer::Vassal;
use strict;
use warnings;

# Everything the vassal path needs is loaded here, at compile time: the base
# vassal loads this module before it forks, so an adopted vassal loads
# nothing between its fork and its first accept().
use ForkServer::Vassal::App ();
use POSIX ();
use Socket qw(SOL_SOCKET SO_ACCEPTCONN SO_REUSEADDR SOMAXCONN SOCK_STREAM AI_PASSIVE AF_UNSPEC AF_INET6
              IPPROTO_IPV6 IPV6_V6ONLY getaddrinfo);
use ForkServer::Config ();
use ForkServer::Vassal::EmperorPipe ();
use ForkServer::Protocol qw(SPAWNED);
use ForkServer::HTTPServer ();
use ForkServer::Vassal::Identity ();
use ForkServer::Process::Dumpable ();
use ForkServer::Log ();
use ForkServer::Process::Session ();
use ForkServer::Process::Environment ();

=head1 NAME

ForkServer::Vassal - configure a vassal (adopted or plain) and serve its app

=head1 SYNOPSIS

  ForkServer::Vassal->new(
      config        => $config,      # ForkServer::Config
      emperor       => $pipe_fh,     # or undef
      config_fh     => $fh,          # the config pipe, kept open; or undef
      preloaded_app => $app,         # the base's early-psgi app; undef in a plain vassal
      use_fd0       => 1,            # serve on descriptor 0 if it is a listening socket
  )->run;                            # returns when the HTTP server stops

=head1 DESCRIPTION

In order: process title, C<env> into C<%ENV>, C<chdir>, the listening
socket (descriptor 0 or C<http-socket>), dropping root privileges (C<uid>,
C<gid>: L<ForkServer::Vassal::Identity>), the app (C<psgi> if given, else
the preloaded app, else C<early-psgi> loaded cold: as the vassal's user,
never as root), byte 1 to the Emperor, then
L<ForkServer::HTTPServer>, which reports bytes 5, 17, 26, 22 itself.

Errors die with a one-line message.

=cut

=head2 warm_up

Called by the base vassal before it serves adoptions: does once, in the
base, what each vassal's first request would otherwise do after the fork
(reading the time zone; the modules Perl loads on demand are loaded by
L<ForkServer::HTTPServer> itself).

=cut

sub warm_up {
    POSIX::tzset();
    my @now = localtime;       # glibc reads /etc/localtime once
    return;
}

sub new {
    my ($class, %args) = @_;
    return bless {%args}, $class;
}

sub run {
    my ($self) = @_;
    my $config = $self->{config};
    die "processes = " . $config->get("processes") . " with master = false: without a master the vassal is one process\n"
        if !$config->get('master') && $config->get('processes') > 1;
    $self->configure unless $self->{configured};    # a spare's warm worker did it when it judged itself
    # what it was given, before anything opens sockets and pipes of its own
    my %given = $> == 0 ? map { $_ => 1 } ForkServer::Process::Dumpable::pathless_links() : ();
    my $sock = $self->listen_socket;
    $given{ readlink('/proc/self/fd/' . fileno($sock)) // '' } = 1 if $> == 0;
    $self->{given_pathless} = \%given;
    my $access_log = $self->access_log;    # opened as whoever may open it
    my $requests_fh = $self->requests_file;
    my $preforked = $self->first_worker($sock, $requests_fh);
    $self->drop_privileges;
    # after the drop: a `psgi` file is its tenant's code, which never runs as root
    my $app = $self->load_app_as_user;
    ForkServer::Vassal::EmperorPipe->send($self->{emperor}, SPAWNED);
    ForkServer::HTTPServer->new(
        listen_sock  => $sock,
        app          => $app,
        emperor_fh   => $self->{emperor},
        config_fh    => $self->{config_fh},
        ($requests_fh ? (requests_fh => $requests_fh) : ()),
        $self->server_args($access_log),
        ($preforked ? (preforked => $preforked) : ()),
        ($self->{settle} ? (settle => $self->{settle}) : ()),
    )->run;
    return;
}

=head2 configure

What every process of the vassal applies for itself, in order: process
title, C<PLACK_ENV> (L<ForkServer::Config/plack_env>), C<env> into C<%ENV>,
C<chdir>. (A spare's waiting worker does it
too: L<ForkServer::Spares>.)

=cut

sub configure {
    my ($self) = @_;
    $0 = $self->title;
    # before the app loads (psgi), as Plack servers do; an env key still wins
    $ENV{PLACK_ENV} = $self->{config}->plack_env;
    $self->apply_env;
    ForkServer::Process::Environment::apply_chdir($self->{config});
    return;
}

sub title {
    my ($self) = @_;
    return $self->{config}->get('procname') // "psgi-vassal " . $self->{config}->name;
}

# An adopted spare's worker, already forked and warm, gets the socket; not
# with a `psgi` app on top of the base (it holds the preloaded one).
sub first_worker {
    my ($self, $sock, $requests_fh) = @_;
    my $worker = $self->{first_worker} or return undef;
    # started by the base's request (ForkServer::Spares::WorkerStart), it judged
    # itself; else: its warm-up ran as the base: not for a vassal that runs as someone else
    my $unfit = $worker->started_early ? defined $worker->verdict
              : defined $self->{config}->get('psgi') || $worker->unfit($self->{config});
    if ($unfit) {
        $worker->discard;
        # and what its warm-up started (as the base's user): the session holds
        # nothing else yet
        ForkServer::Process::Session::end_others(leader_only => 1, grace => 1);
        return undef;
    }
    # it may have died since the spare last looked: fresh workers then
    my $preforked = eval { $worker->start($sock, $requests_fh) };
    $worker->discard unless $preforked;
    return $preforked;
}

=head2 server_args($access_log_fh)

The L<ForkServer::HTTPServer> options this vassal's config gives (all but
the socket, the app and the Emperor pipe), with the access log's handle
(L</access_log>, opened before privileges are dropped).

=cut

sub server_args {
    my ($self, $access_log) = @_;
    my $config = $self->{config};
    return (
        solo         => $config->get('master') ? 0 : 1,
        workers      => $config->get('processes'),
        max_requests => $config->get('max-requests'),
        harakiri     => $config->get('harakiri'),
        name         => $config->name,
        heartbeat    => $config->get('heartbeat'),
        idle         => $config->get('idle'),
        access_log   => $access_log,
        access_log_path => $config->get('disable-logging') ? undef : $config->get('access-log'),
        proctitle    => $self->title,
        max_body_size     => $config->get('limit-post'),
        max_header_size   => $config->get('buffer-size'),
        socket_timeout    => $config->get('socket-timeout'),
        header_timeout    => $config->get('http-header-timeout'),
        body_timeout      => $config->get('http-body-timeout'),
        response_timeout  => $config->get('http-response-timeout'),
        keepalive_timeout => $config->get('http-keepalive-timeout'),
        keepalive_handoff => $config->get('http-keepalive-handoff') ? 1 : 0,
        desk_dumpable     => $self->{dropped_dumpable} ? 1 : 0,
        protocol          => defined $config->get('socket') ? 'uwsgi' : 'http',
        # adopted from a base that learns what its vassals load lazily
        after_request => (do { no warnings 'once'; defined $ForkServer::Base::Learned::ADDRESS })
                         ? \&ForkServer::Base::Learned::report : undef,
    );
}

=head2 access_log() -> $fh

The access log's handle: none with C<disable-logging>, the C<access-log>
file opened for appending (relative to C<chdir>), or STDERR (which the
Emperor collects). Dies with one line when the file cannot be opened.

=cut

sub access_log {
    my ($self) = @_;
    my $config = $self->{config};
    return undef if $config->get('disable-logging');
    my $path = $config->get('access-log');
    return \*STDERR unless defined $path;
    # with the rights of the user it becomes: a symlink in a directory that
    # user owns must not give it a root-only file to append to
    return ForkServer::Vassal::Identity::as_target($config, sub {
        open(my $log, '>>', $path) or die "cannot open access-log '$path': $!\n";
        return $log;
    });
}

# Directly into %ENV: Perl's %ENV is what the app reads.
sub apply_env {
    my ($self) = @_;
    ForkServer::Process::Environment::apply_env($self->{config});
    return;
}

sub load_app {
    my ($self) = @_;
    my $config = $self->{config};
    my $file = $config->get('psgi');
    if (!defined $file) {
        return $self->{preloaded_app} if $self->{preloaded_app};
        $file = $config->get('early-psgi');
        die "no app: give --psgi FILE (or --early-psgi FILE)\n" unless defined $file;
    }
    return ForkServer::Vassal::App::load($file);
}

# The app, loaded after the drop. Dropping root cleared the "dumpable"
# flag, so whether the app clears it itself (to keep its memory from other
# processes of its uid) cannot be seen afterwards: while it loads, the flag
# is set as the workers' desk would set it (the app's code may read all of
# this process anyway), and an app that cleared it keeps its workers not
# dumpable. The master is not dumpable once it has loaded.
sub load_app_as_user {
    my ($self) = @_;
    my $loads_here = defined $self->{config}->get('psgi') || !$self->{preloaded_app};
    return $self->load_app unless $self->{dropped_dumpable} && $loads_here;
    ForkServer::Process::Dumpable::restore_unprivileged();
    my $app = eval { $self->load_app };
    my $err = $@;
    $self->{dropped_dumpable} = 0 unless (ForkServer::Process::Dumpable::get() // 0) == 1;
    ForkServer::Process::Dumpable::clear();
    die $err unless $app;
    return $app;
}

sub listen_socket {
    my ($self) = @_;
    # a spare's warm worker that is the vassal itself has it already
    return $self->{listen_sock} if $self->{listen_sock};
    if ($self->{use_fd0} and my $sock = inherited_listener()) {
        return $sock;
    }
    # bound already by a spare's warm worker (ForkServer::Spares::WorkerStart)
    my $bound = $self->{first_worker} && $self->{first_worker}->bound_fd;
    return listener_from_fd($bound) // die "the socket the warm worker bound: $!\n" if defined $bound;
    my $addr = $self->{config}->get('http-socket') // $self->{config}->get('socket');
    die "no socket: give --http-socket ADDR (or pass a listening socket as descriptor 0)\n"
        unless defined $addr;
    return listen_unix($addr, $self->{config}->get('listen')) if $addr =~ m{/} || $addr !~ /:/;
    my ($host, $port) = ForkServer::Config::parse_address($addr);
    my $backlog = $self->{config}->get('listen');
    my ($sock, $err);
    if (defined $host) {
        ($sock, $err) = listen_inet($host, $port, $backlog);
    }
    else {    # all addresses: a dual-stack socket if the machine has IPv6
        ($sock, $err) = listen_inet('::', $port, $backlog, 0);
        ($sock, $err) = listen_inet('0.0.0.0', $port, $backlog) unless $sock;
    }
    die "cannot listen on http-socket $addr: $err\n" unless $sock;
    return $sock;
}

=head2 listen_inet($host, $port, $backlog, $v6only) -> ($handle) or (undef, $error)

A listening TCP socket on C<$host> (a name or an address) and C<$port>,
with C<SO_REUSEADDR>, and C<IPV6_V6ONLY> set to C<$v6only> when given and
the address is IPv6: what C<IO::Socket::IP> makes with the same arguments
(each address C<getaddrinfo> gives tried in turn until one binds; the
error of the last bind, else of the last socket), with plain system calls,
which cost a vassal's start-up a fraction of its object's making.

=cut

sub listen_inet {
    my ($host, $port, $backlog, $v6only) = @_;
    my ($gai, @infos) = getaddrinfo($host, $port, { socktype => SOCK_STREAM, flags => AI_PASSIVE, family => AF_UNSPEC });
    return (undef, "$gai") if $gai;
    my ($bind_err, $socket_err);
    for my $info (@infos) {
        socket(my $sock, $info->{family}, $info->{socktype}, $info->{protocol}) or do { $socket_err = "$!"; next };
        setsockopt($sock, SOL_SOCKET, SO_REUSEADDR, 1) or return (undef, "$!");
        if (defined $v6only && $info->{family} == AF_INET6) {
            setsockopt($sock, IPPROTO_IPV6, IPV6_V6ONLY, $v6only) or return (undef, "$!");
        }
        bind($sock, $info->{addr}) or do { $bind_err = "$!"; next };
        listen($sock, $backlog) or return (undef, "$!");
        return ($sock);
    }
    return (undef, $bind_err // $socket_err // 'no address to listen on');
}

=head2 listen_unix($path, $backlog)

A listening UNIX socket at C<$path> (http-socket with a C</>, when no
Emperor passes one): a stale socket file there is replaced.

=cut

sub listen_unix {
    my ($path, $backlog) = @_;
    require IO::Socket::UNIX;
    unlink $path if -S $path && !IO::Socket::UNIX->new(Peer => $path);
    my $sock = IO::Socket::UNIX->new(Local => $path, Listen => $backlog, Type => Socket::SOCK_STREAM())
        or die "cannot listen on http-socket $path: " . ($@ || $!) . "\n";
    return $sock;
}

=head2 inherited_listener()

If descriptor 0 is a listening socket (the Emperor's on-demand socket),
returns it as a handle (L</listener_from_fd>) on a close-on-exec duplicate
and points descriptor 0 at /dev/null, so the app's STDIN is not the server
socket.

=cut

sub inherited_listener {
    my $listening = getsockopt(STDIN, SOL_SOCKET, SO_ACCEPTCONN);
    return undef unless $listening && unpack('i', $listening);
    my $fd = POSIX::dup(0) // die "dup of descriptor 0: $!\n";
    my $sock = listener_from_fd($fd) or die "descriptor 0: $!\n";
    ForkServer::Vassal::EmperorPipe->set_cloexec($sock);
    open STDIN, '<', '/dev/null' or die "reopening STDIN: $!\n";
    return $sock;
}

=head2 listener_from_fd($fd) -> $handle

A plain Perl handle on the listening socket C<$fd> (the server only
C<accept>s on it and asks its name), or undef: not an IO::Socket object,
whose making (a symbol in Symbol's stash, a blessed glob) costs a process
forked from the base some copy-on-write page faults for nothing.

=cut

sub listener_from_fd {
    my ($fd) = @_;
    open(my $sock, '+<&=', $fd) or return undef;
    return $sock;
}

# The status's requests file, made while still root for the uid this
# vassal drops to (ForkServer::HTTPServer::Counts).
sub requests_file {
    my ($self) = @_;
    return undef unless $> == 0;
    my $id = ForkServer::Vassal::Identity::target($self->{config}) // return undef;
    return ForkServer::HTTPServer::Counts::make_requests_file($$, $id->{uid}, $id->{gid});
}

# Groups, gid, uid, then checked with the kernel (ForkServer::Vassal::Identity).
# The kernel clears the "dumpable" flag then. When the drop, not the app,
# cleared it, and the process holds nothing it opened as root that its new
# user could not open (an app loaded before the drop may), its workers may
# set it again for the desk (server_args' desk_dumpable; docs/security.md).
sub drop_privileges {
    my ($self) = @_;
    my $before = ForkServer::Process::Dumpable::get() // 0;
    ForkServer::Vassal::Identity::drop($self->{config});
    $self->{dropped_dumpable} = 0;
    return unless $before == 1 && (ForkServer::Process::Dumpable::get() // 1) == 0;
    my $config = $self->{config};
    return unless ($config->get('processes') // 1) > 1 && $config->get('http-keepalive-handoff');
    if (my @foreign = ForkServer::Process::Dumpable::foreign_descriptors($self->{given_pathless})) {
        ForkServer::Log::line($config->name, "workers stay not dumpable, no desk (the earlier hand-over): "
            . "the app holds what it opened as root and uid $< may not open: @foreign");
        return;
    }
    $self->{dropped_dumpable} = 1;
    return;
}

1;
