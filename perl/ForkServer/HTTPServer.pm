package ForkServer::HTTPServer;
use strict;
use warnings;

# Everything the master and the workers will ever need is loaded here, at
# `use` time, in the base vassal: an adopted vassal forks with these pages
# already compiled and shared, and run() loads nothing.
use Carp ();
use Config ();
use Errno qw(EINTR EAGAIN ECONNABORTED);
use POSIX ();
use Socket qw(IPPROTO_TCP TCP_NODELAY SOL_SOCKET SO_RCVTIMEO SO_SNDTIMEO SO_REUSEADDR
              AF_INET AF_INET6 AF_UNIX AF_UNSPEC SOCK_STREAM AI_PASSIVE
              getaddrinfo inet_ntop unpack_sockaddr_in unpack_sockaddr_in6 sockaddr_family);
use IO::Handle ();
# An in-memory open (an empty psgi.input, a buffered body) loads these on its
# first use. Loaded here, a worker never searches @INC while serving: not
# after the fork (an adopted vassal shares them with the base), and not
# after dropping privileges to a uid that may not read every @INC directory.
use PerlIO ();
use PerlIO::scalar ();
use HTTP::Parser::XS qw(parse_http_request);
use HTTP::Status ();
use Time::HiRes ();
use ForkServer::HTTPServer::Writer ();

our $VERSION = '0.01';

use constant {
    MSG_ACCEPTING => 1,    # worker -> master: I am in accept()
    MSG_ACTIVITY  => 2,    # worker -> master: a request arrived (for `idle`)
    MSG_BUSY      => 3,    # worker -> master: in a request (harakiri only), payload: request
    MSG_DONE      => 4,    # worker -> master: request finished (harakiri only)
    EXIT_HARAKIRI => 86,   # worker exit status after harakiri
    EXIT_RECYCLE  => 0,
    READ_CHUNK    => 65536,
    ACCEPT_WAKEUP => 1,    # seconds: longest a worker blocks in accept() without rechecking its stop flag
    CRLF          => "\015\012",
};

# Emperor pipe bytes (PROTOCOL.md section 5).
use constant {
    EMP_STOP_NOW  => 0,
    EMP_RELOAD    => 1,
    EMP_STOP      => 2,
    EMP_ACCEPTING => 5,
    EMP_LOYAL     => 17,
    EMP_IDLE      => 22,
    EMP_HEARTBEAT => 26,
};

# prctl(2) number, to ask the kernel to signal a worker when its master dies
# (no CPAN module for it; syscall.ph is slow to load). Unknown arch: the
# worker falls back to noticing getppid() change between connections.
my %PRCTL = (x86_64 => 157, aarch64 => 167, i386 => 172, i686 => 172);
my ($ARCH) = ($Config::Config{archname} =~ /^([^-]+)/);
my $SYS_PRCTL = $PRCTL{$ARCH // ''};

my $BLOCK_SET = POSIX::SigSet->new(map { POSIX->can("SIG$_")->() } qw(TERM INT QUIT HUP CHLD ALRM));

# The PSGI keys that are the same in every request this server makes
# (ForkServer::Warmup builds its synthetic request from them too).
my @CONSTANT_ENV = (
    'psgi.version'         => [1, 1],
    'psgi.errors'          => *STDERR,
    'psgi.url_scheme'      => 'http',
    'psgi.run_once'        => '',
    'psgi.multithread'     => '',
    'psgi.multiprocess'    => 1,
    'psgi.streaming'       => 1,
    'psgi.nonblocking'     => '',
    'psgix.input.buffered' => 1,
);

=head2 constant_env() -> LIST

The key/value pairs of the PSGI environment that every request gets.

=cut

sub constant_env { return @CONSTANT_ENV }

my @MON = qw(Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec);
my @DAY = qw(Sun Mon Tue Wed Thu Fri Sat);

sub _now { Time::HiRes::clock_gettime(Time::HiRes::CLOCK_MONOTONIC()) }

sub new {
    my ($class, %args) = @_;
    my $self = bless {
        workers          => 1,
        max_requests     => 0,
        harakiri         => 0,
        name             => 'psgi',
        heartbeat        => 0,
        idle             => 0,
        mercy            => 10,
        max_header_size  => 8192,
        max_body_size    => 0,        # 0: no limit
        body_buffer_size => 65536,
        read_timeout     => 30,       # a client silent this long mid-request is dropped
        keepalive_timeout => 1,       # an idle keep-alive connection holds a worker this long (as Starman)
        listen_backlog   => 1024,
        %args,
    }, $class;
    $self->{access_log} = \*STDERR unless exists $args{access_log};
    Carp::croak('app is required') unless ref $self->{app} eq 'CODE';
    $self->{workers} = 1 if !$self->{workers} || $self->{workers} < 1;
    $self->{proctitle} //= "psgi-vassal $self->{name}";
    return $self;
}

# ---------------------------------------------------------------------------
# Master
# ---------------------------------------------------------------------------

sub run {
    my $self = shift;

    # Signals only set flags; the loop acts on them. The select() timeout is
    # capped so a signal landing just before select() is seen within 1 s.
    my %sig;
    local $SIG{HUP}  = sub { $sig{HUP}  = 1 };
    local $SIG{TERM} = sub { $sig{TERM} = 1 };
    local $SIG{INT}  = sub { $sig{INT}  = 1 };
    local $SIG{QUIT} = sub { $sig{INT}  = 1 };
    local $SIG{CHLD} = sub { $sig{CHLD} = 1 };
    local $SIG{PIPE} = 'IGNORE';

    $self->_setup_listener;
    $0 = $self->{proctitle} if length $self->{proctitle};

    pipe(my $ready_r, my $ready_w) or die "pipe: $!";
    $self->{ready_r} = $ready_r;
    $self->{ready_w} = $ready_w;
    $self->{master_pid} = $$;
    $self->{gen} = 1;
    $self->{kids} = {};        # pid => { slot, gen, ready, born }
    $self->{slot_fast_deaths} = {};
    $self->{respawn} = {};     # slot => time
    $self->{sent_accepting} = 0;
    $self->{sent_loyal} = 0;
    $self->{stopping} = 0;     # 0, 'graceful' or 'now'
    my $efh = $self->{emperor_fh};
    $self->{emperor_open} = $efh ? 1 : 0;

    $self->{server_ready}->({
        host => $self->{server_name}, port => $self->{server_port},
        server_software => 'ForkServer',
    }) if $self->{server_ready};

    $self->_spawn_worker($_) for 1 .. $self->{workers};

    my $start = _now();
    my $hb = $self->{heartbeat} > 0 ? $self->{heartbeat} / 2 : 0;
    my $next_hb;
    $self->{last_activity} = $start;
    $self->{idle_sent} = 0;
    my $kill_at;

    while (1) {
        # --- act on signals
        if (delete $sig{CHLD}) { $self->_reap }
        if (delete $sig{INT})  { $self->_stop_now; last }
        if (delete $sig{TERM}) { $kill_at = $self->_begin_graceful_stop($kill_at) }
        if (delete $sig{HUP})  { $self->_reload }

        if ($self->{stopping}) {
            last unless %{ $self->{kids} };
            if (_now() >= $kill_at) {
                kill 'KILL', keys %{ $self->{kids} };
                $kill_at = _now() + 3600;   # only once; the reaping goes on
            }
        }

        my $now = _now();
        my $timeout = 1;
        if (!$self->{stopping}) {
            # respawns waiting out a crash-loop back-off
            for my $slot (keys %{ $self->{respawn} }) {
                my $at = $self->{respawn}{$slot};
                if ($at <= $now) { delete $self->{respawn}{$slot}; $self->_spawn_worker($slot) }
                else { $timeout = $at - $now if $at - $now < $timeout }
            }
            # Harakiri, master side: the worker's own alarm normally ends it;
            # this catches one whose Perl signal handler cannot run (stuck
            # inside an XS call that restarts on EINTR).
            if (my $h = $self->{harakiri}) {
                for my $pid (keys %{ $self->{kids} }) {
                    my $k = $self->{kids}{$pid};
                    my $since = $k->{busy_since} // next;
                    my $at = $since + $h + 1;
                    if ($at <= $now) {
                        warn "$self->{name}: harakiri: worker $k->{slot} (pid $pid) stuck more than ${h}s in $k->{request}, killed by the master\n";
                        kill 'KILL', $pid;
                        delete $k->{busy_since};
                    } elsif ($at - $now < $timeout) { $timeout = $at - $now }
                }
            }
            for my $pid (keys %{ $self->{kids} }) {
                my $at = $self->{kids}{$pid}{kill_at} // next;
                if ($at <= $now) {
                    warn "$self->{name}: worker pid $pid still busy $self->{mercy}s after reload, killed\n";
                    kill 'KILL', $pid;
                    $self->{kids}{$pid}{kill_at} = $now + 3600;
                } elsif ($at - $now < $timeout) { $timeout = $at - $now }
            }
            if ($hb && $self->{sent_accepting}) {
                $next_hb //= $now;
                if ($now >= $next_hb) { $self->_emperor_send(EMP_HEARTBEAT); $next_hb = $now + $hb }
                $timeout = $next_hb - $now if $next_hb - $now < $timeout;
            }
            if ($self->{idle} > 0 && !$self->{idle_sent}) {
                my $at = $self->{last_activity} + $self->{idle};
                if ($now >= $at) { $self->_emperor_send(EMP_IDLE); $self->{idle_sent} = 1 }
                elsif ($at - $now < $timeout) { $timeout = $at - $now }
            }
        } else {
            $timeout = $kill_at - $now if $kill_at - $now < $timeout;
        }
        $timeout = 0 if $timeout < 0;

        my $rin = '';
        vec($rin, fileno($ready_r), 1) = 1;
        vec($rin, fileno($efh), 1) = 1 if $self->{emperor_open};
        next if %sig;    # a signal arrived while we were busy: no waiting
        my $n = select(my $rout = $rin, undef, undef, $timeout);
        next if $n <= 0;

        if (vec($rout, fileno($ready_r), 1)) { $self->_read_worker_messages }
        if ($self->{emperor_open} && vec($rout, fileno($efh), 1)) {
            my $got = sysread($efh, my $bytes, 64);
            if (defined $got && $got == 0) {
                # The Emperor is gone (CONTRACT.md): graceful stop.
                $self->{emperor_open} = 0;
                $kill_at = $self->_begin_graceful_stop($kill_at);
            } elsif ($got) {
                for my $b (unpack 'C*', $bytes) {
                    if ($b == EMP_STOP_NOW) { $sig{INT} = 1 }
                    elsif ($b == EMP_RELOAD) { $sig{HUP} = 1 }
                    elsif ($b == EMP_STOP) { $sig{TERM} = 1 }
                }
            } elsif ($! != EINTR && $! != EAGAIN) {
                $self->{emperor_open} = 0;
                $kill_at = $self->_begin_graceful_stop($kill_at);
            }
        }
    }

    $self->_reap_blocking;
    close $ready_r; close $ready_w;
    if ($self->{own_listener}) { close $self->{listen_sock}; }
    return;
}

sub _setup_listener {
    my $self = shift;
    my $sock = $self->{listen_sock};
    unless ($sock) {
        # plain socket/bind/listen: IO::Socket::IP would cost ~15 ms to load
        my $host = $self->{host} // '0.0.0.0';
        $host = '0.0.0.0' if $host eq '*' || $host eq '';
        $host =~ s/^\[(.*)\]$/$1/;
        my $port = $self->{port} // 5000;
        my $where = "$self->{name}: cannot listen on $host:$port";
        my ($err, @ai) = getaddrinfo($host, $port, { socktype => SOCK_STREAM, flags => AI_PASSIVE, family => AF_UNSPEC });
        die "$where: $err\n" if $err || !@ai;
        my $ai = $ai[0];
        socket($sock, $ai->{family}, SOCK_STREAM, 0) or die "$where: socket: $!\n";
        setsockopt($sock, SOL_SOCKET, SO_REUSEADDR, 1) or die "$where: setsockopt: $!\n";
        bind($sock, $ai->{addr}) or die "$where: $!\n";
        listen($sock, $self->{listen_backlog}) or die "$where: listen: $!\n";
        $self->{listen_sock} = $sock;
        $self->{own_listener} = 1;
    }
    # SERVER_NAME / SERVER_PORT are per listener: compute them once.
    my $name = getsockname($sock) or die "getsockname: $!";
    my ($port, $addr);
    if (sockaddr_family($name) == AF_UNIX) {
        # behind a front door: the Host header names the site, not the socket
        ($port, $addr) = (0, 'localhost');
    } elsif (sockaddr_family($name) == AF_INET6) {
        ($port, $addr) = unpack_sockaddr_in6($name);
        $addr = inet_ntop(AF_INET6, $addr);
    } else {
        ($port, $addr) = unpack_sockaddr_in($name);
        $addr = inet_ntop(AF_INET, $addr);
    }
    $self->{server_name} = $self->{host} && $self->{host} ne '*' ? $self->{host} : $addr;
    $self->{server_port} = $port;
    $self->{port} //= $port;
}

sub _emperor_send {
    my ($self, $byte) = @_;
    return unless $self->{emperor_fh};
    # A vanished Emperor is noticed through EOF on read; ignore EPIPE here.
    syswrite($self->{emperor_fh}, chr($byte));
}

sub _spawn_worker {
    my ($self, $slot) = @_;
    # Signals stay blocked across fork() until the worker has its own
    # handlers: a SIGTERM sent to a newborn worker would otherwise hit the
    # master's inherited flag-setting handler and be lost.
    my $old = POSIX::SigSet->new;
    POSIX::sigprocmask(POSIX::SIG_BLOCK(), $BLOCK_SET, $old);
    my $pid = fork;
    unless (defined $pid) {
        warn "$self->{name}: fork failed: $!\n";
        POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
        $self->{respawn}{$slot} = _now() + 1;
        return;
    }
    if ($pid == 0) {
        $self->{sigmask} = $old;
        my $code = eval { $self->_worker_main($slot); 0 };
        unless (defined $code) { warn "$self->{name}: worker $slot: $@"; $code = 1 }
        _worker_exit($code);
    }
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
    $self->{kids}{$pid} = { slot => $slot, gen => $self->{gen}, ready => 0, born => _now() };
    return $pid;
}

# Worker -> master records: pid, type, payload length, payload. Each is
# written with one write(2) of less than PIPE_BUF bytes, so records of
# different workers never interleave; a read may still end mid-record.
sub _worker_msg {
    my ($fh, $type, $payload) = @_;
    $payload //= '';
    syswrite($fh, pack('NNn/a*', $$, $type, substr($payload, 0, 400)));
}

sub _read_worker_messages {
    my $self = shift;
    my $got = sysread($self->{ready_r}, $self->{msgbuf}, 16384, length($self->{msgbuf} //= ''));
    return unless $got;
    my $now = _now();
    while (length $self->{msgbuf} >= 10) {
        my ($pid, $type, $len) = unpack 'NNn', $self->{msgbuf};
        last if length $self->{msgbuf} < 10 + $len;
        my $payload = substr($self->{msgbuf}, 10, $len);
        substr($self->{msgbuf}, 0, 10 + $len, '');
        if ($type == MSG_ACCEPTING) {
            my $k = $self->{kids}{$pid} or next;
            $k->{ready} = 1;
            unless ($self->{sent_accepting}) {
                $self->{sent_accepting} = 1;
                $self->_emperor_send(EMP_ACCEPTING);
            }
            if (!$self->{sent_loyal} && !$self->{stopping}) {
                my $ready = grep { $_->{ready} && $_->{gen} == $self->{gen} } values %{ $self->{kids} };
                if ($ready >= $self->{workers}) {
                    $self->{sent_loyal} = 1;
                    $self->_emperor_send(EMP_LOYAL);
                }
            }
        } elsif ($type == MSG_ACTIVITY) {
            $self->{last_activity} = $now;
            $self->{idle_sent} = 0;
        } elsif ($type == MSG_BUSY) {
            my $k = $self->{kids}{$pid} or next;
            $k->{busy_since} = $now;
            $k->{request} = $payload;
        } elsif ($type == MSG_DONE) {
            my $k = $self->{kids}{$pid} or next;
            delete $k->{busy_since};
        }
    }
}

sub _reap {
    my $self = shift;
    while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
        my $status = $?;
        my $k = delete $self->{kids}{$pid} or next;   # not a worker (an app's child)
        next if $self->{stopping} || $k->{gen} != $self->{gen};
        my $slot = $k->{slot};
        my $code = $status >> 8;
        my $intended = !($status & 127) && ($code == EXIT_RECYCLE || $code == EXIT_HARAKIRI);
        if (!$intended) {
            warn sprintf("%s: worker %d (pid %d) died (%s), respawning\n", $self->{name}, $slot, $pid,
                         ($status & 127) ? "signal " . ($status & 127) : "exit $code");
        }
        # A worker that dies young, again and again, is crash-looping: back off
        # instead of forking flat out.
        if (!$intended && _now() - $k->{born} < 1) {
            my $n = ++$self->{slot_fast_deaths}{$slot};
            if ($n >= 3) {
                my $delay = 0.1 * 2 ** ($n - 3);
                $delay = 5 if $delay > 5;
                $self->{respawn}{$slot} = _now() + $delay;
                next;
            }
        } else {
            $self->{slot_fast_deaths}{$slot} = 0;
        }
        $self->_spawn_worker($slot);
    }
}

sub _reap_blocking {
    my $self = shift;
    for my $pid (keys %{ $self->{kids} }) {
        waitpid($pid, 0);
        delete $self->{kids}{$pid};
    }
}

sub _reload {
    my $self = shift;
    return if $self->{stopping};
    # New workers from the app already in memory; the old generation gets
    # SIGTERM, which an idle worker obeys at once and a busy one after its
    # in-flight request.
    my @old = keys %{ $self->{kids} };
    $self->{gen}++;
    %{ $self->{respawn} } = ();
    # an old worker still busy after `mercy` seconds is killed
    my $deadline = _now() + $self->{mercy};
    $self->{kids}{$_}{kill_at} //= $deadline for @old;
    kill 'TERM', @old if @old;
    $self->_spawn_worker($_) for 1 .. $self->{workers};
}

sub _begin_graceful_stop {
    my ($self, $kill_at) = @_;
    return $kill_at if $self->{stopping};
    $self->{stopping} = 'graceful';
    kill 'TERM', keys %{ $self->{kids} };
    return _now() + $self->{mercy};
}

sub _stop_now {
    my $self = shift;
    $self->{stopping} = 'now';
    kill 'KILL', keys %{ $self->{kids} };
}

# ---------------------------------------------------------------------------
# Worker
# ---------------------------------------------------------------------------

sub _worker_exit {
    my $code = shift;
    # _exit: the app's END blocks and destructors belong to the vassal, not
    # to every worker; flush what Perl buffered first.
    STDOUT->flush; STDERR->flush;
    POSIX::_exit($code);
}

sub _worker_main {
    my ($self, $slot) = @_;
    my $master = $self->{master_pid};
    $self->{slot} = $slot;

    # SIGTERM only sets a flag. Exiting from the handler when "not busy" was
    # a race: Perl runs the handler at the next op boundary, which may fall
    # after accept() returned a connection and before the worker marked
    # itself busy, and the client saw a reset. Perl's handlers are installed without
    # SA_RESTART, so a TERM during accept() makes it return EINTR and the
    # loop condition sees the flag; one landing between that check and the
    # accept(2) call is caught by the listener's SO_RCVTIMEO (below).
    my $stopping = 0;
    $SIG{TERM} = sub { $stopping = 1 };
    $SIG{HUP}  = 'IGNORE';          # the master reloads; a worker keeps going
    $SIG{INT}  = 'DEFAULT';
    $SIG{QUIT} = 'DEFAULT';
    $SIG{CHLD} = 'DEFAULT';
    $SIG{PIPE} = 'IGNORE';          # a vanished client is an EPIPE, not a death
    $self->{stopping_ref} = \$stopping;
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), delete $self->{sigmask});

    # Die with the master (SIGTERM: finish the request first).
    syscall($SYS_PRCTL, 1, POSIX::SIGTERM(), 0, 0, 0) if $SYS_PRCTL;
    _worker_exit(0) if getppid() != $master;

    close $self->{ready_r};
    if (my $efh = $self->{emperor_fh}) {
        # The Emperor pipe belongs to the master alone: a worker holding it
        # would hide the master's death from the Emperor.
        close $efh;
        delete $self->{emperor_fh};
    }
    $0 = "$self->{proctitle} worker $slot" if length $self->{proctitle};

    if (my $h = $self->{harakiri}) {
        $SIG{ALRM} = sub {
            my $req = $self->{current_request} // '(unknown request)';
            syswrite(STDERR, "$self->{name}: harakiri: worker $slot (pid $$) stuck more than ${h}s in $req, killed\n");
            _worker_exit(EXIT_HARAKIRI);
        };
    }

    $self->{requests} = 0;
    my $listen = $self->{listen_sock};
    my $ready_w = $self->{ready_w};
    _worker_msg($ready_w, MSG_ACCEPTING);

    my $rtimeo = pack('l!l!', $self->{read_timeout}, 0);
    # accept(2) honours SO_RCVTIMEO: a blocked accept returns EAGAIN at least
    # once a second, so a SIGTERM whose handler ran just before the call
    # (the flag set, but accept not interrupted) is seen within a second.
    # The option belongs to the socket, shared by every worker: idempotent.
    setsockopt($listen, SOL_SOCKET, SO_RCVTIMEO, pack('l!l!', ACCEPT_WAKEUP, 0));
    while (!$stopping) {
        my $peer = accept(my $conn, $listen);
        unless ($peer) {
            next if $! == EINTR || $! == EAGAIN || $! == ECONNABORTED;
            # EMFILE, ENOBUFS...: transient pressure; don't spin, don't die
            warn "$self->{name}: accept: $!\n";
            select(undef, undef, undef, 0.1);
            next;
        }
        # Per connection, not per request: no Nagle delay on split writes; a
        # silent client cannot hold the worker forever.
        setsockopt($conn, IPPROTO_TCP, TCP_NODELAY, 1);
        setsockopt($conn, SOL_SOCKET, SO_RCVTIMEO, $rtimeo);
        setsockopt($conn, SOL_SOCKET, SO_SNDTIMEO, $rtimeo);
        my ($rport, $raddr) = (0, '');
        my $fam = sockaddr_family($peer);
        if ($fam == AF_INET) {
            ($rport, $raddr) = unpack_sockaddr_in($peer);
            $raddr = inet_ntop(AF_INET, $raddr);
        } elsif ($fam == AF_INET6) {
            ($rport, $raddr) = unpack_sockaddr_in6($peer);
            $raddr = inet_ntop(AF_INET6, $raddr);
        }
        eval { $self->_serve_connection($conn, $raddr, $rport); 1 }
            or do { warn "$self->{name}: $@" unless $@ =~ /^ForkServer::client-gone/ };
        close $conn;
        last if $stopping || $self->{harakiri_commit};
        last if $self->{max_requests} && $self->{requests} >= $self->{max_requests};
        _worker_exit(0) if !$SYS_PRCTL && getppid() != $master;
    }
    _worker_exit(EXIT_RECYCLE);
}

# Status lines are few; build each once.
my %STATUS_LINE;
sub _status_line {
    my $s = shift;
    return $STATUS_LINE{$s} //= "HTTP/1.1 $s " . (HTTP::Status::status_message($s) // 'Unknown') . CRLF;
}

# Date: header and access-log time, recomputed once a second.
my ($clock_sec, $http_date, $log_date) = (-1);
sub _tick {
    my $t = time;
    return if $t == $clock_sec;
    $clock_sec = $t;
    my @g = gmtime $t;
    $http_date = sprintf("%s, %02d %s %04d %02d:%02d:%02d GMT",
        $DAY[$g[6]], $g[3], $MON[$g[4]], $g[5] + 1900, $g[2], $g[1], $g[0]);
    my @l = localtime $t;
    my $off = POSIX::strftime('%z', @l);
    $log_date = sprintf("%02d/%s/%04d:%02d:%02d:%02d %s",
        $l[3], $MON[$l[4]], $l[5] + 1900, $l[2], $l[1], $l[0], $off);
}

sub _write_all {
    my ($conn, $data) = @_;
    my $len = length $data;
    my $off = 0;
    while ($off < $len) {
        my $n = syswrite($conn, $data, $len - $off, $off);
        if (!defined $n) {
            next if $! == EINTR;
            die "ForkServer::client-gone: write: $!\n";
        }
        $off += $n;
    }
    return $len;
}

# Reads more bytes into $$bufref; returns the count; 0 means EOF or timeout.
sub _fill {
    my ($conn, $bufref, $want) = @_;
    while (1) {
        my $n = sysread($conn, $$bufref, $want || READ_CHUNK, length $$bufref);
        return $n if defined $n;
        next if $! == EINTR;
        return 0;    # EAGAIN from SO_RCVTIMEO, ECONNRESET, ...
    }
}

sub _error_response {
    my ($self, $conn, $status, $env) = @_;
    _tick();
    my $msg = HTTP::Status::status_message($status) // 'Error';
    my $body = "$status $msg\n";
    eval {
        _write_all($conn, _status_line($status)
            . "Date: $http_date" . CRLF
            . "Content-Type: text/plain" . CRLF
            . "Content-Length: " . length($body) . CRLF
            . "Connection: close" . CRLF . CRLF . $body);
    };
    $self->_access_log($env || {}, $status, length $body);
}

sub _access_log {
    my ($self, $env, $status, $bytes) = @_;
    my $fh = $self->{access_log} or return;
    _tick();
    my $line = sprintf qq{%s %s - %s [%s] "%s %s %s" %s %s\n},
        $self->{name}, $env->{REMOTE_ADDR} // '-', $env->{REMOTE_USER} // '-', $log_date,
        $env->{REQUEST_METHOD} // '-', $env->{REQUEST_URI} // '-', $env->{SERVER_PROTOCOL} // '-',
        $status, $bytes ? $bytes : '-';
    # One write(2) per line so lines of concurrent workers never interleave.
    syswrite($fh, $line);
}

sub _serve_connection {
    my ($self, $conn, $raddr, $rport) = @_;
    my $app = $self->{app};
    my $buf = '';
    my $first = 1;
    my $max_header = $self->{max_header_size};
    my $idle = $self->{idle};
    my $last_note = 0;
    my $stopping = $self->{stopping_ref};
    my $harakiri = $self->{harakiri};
    my $informational = sub { _write_informational($conn, @_) };

    while (1) {
        # ---- wait for a request
        if (!$first && $buf eq '') {
            # Keep-alive: an idle connection holds this worker; give it back
            # after keepalive_timeout. A TERM (EINTR, or already received)
            # ends the wait, but a request the client has already sent is
            # still answered: closing with unread bytes would send a reset.
            my $rin = '';
            vec($rin, fileno($conn), 1) = 1;
            my $n = select(my $rout = $rin, undef, undef, $$stopping ? 0 : $self->{keepalive_timeout});
            $n = select($rout = $rin, undef, undef, 0) if $n < 0 && $! == EINTR;
            return if $n <= 0;
        }
        $first = 0;

        my %env = (
            SCRIPT_NAME         => '',
            SERVER_NAME         => $self->{server_name},
            SERVER_PORT         => $self->{server_port},
            REMOTE_ADDR         => $raddr,
            REMOTE_PORT         => $rport,
            @CONSTANT_ENV,
            'psgix.harakiri'    => 1,
            'psgix.informational' => $informational,
            'psgix.io'          => $conn,
        );

        # ---- request head
        my $hlen;
        while (1) {
            if ($buf ne '') {
                $hlen = parse_http_request($buf, \%env);
                last if $hlen >= 0;
                if ($hlen == -1) { $self->_error_response($conn, 400); return }
                if (length $buf > $max_header) { $self->_error_response($conn, 431); return }
            }
            return unless _fill($conn, \$buf);   # EOF or timeout between requests: quietly done
        }
        if ($hlen > $max_header) { $self->_error_response($conn, 431, \%env); return }
        substr($buf, 0, $hlen, '');

        if ($idle > 0) {
            my $t = time;
            if ($t != $last_note) {
                _worker_msg($self->{ready_w}, MSG_ACTIVITY);
                $last_note = $t;
            }
        }

        my $proto = $env{SERVER_PROTOCOL};
        my $connection = $env{HTTP_CONNECTION};
        my $keep;
        if ($proto eq 'HTTP/1.1') {
            $keep = !(defined $connection && $connection =~ /\bclose\b/i);
            unless (defined $env{HTTP_HOST}) { $self->_error_response($conn, 400, \%env); return }
        } elsif ($proto eq 'HTTP/1.0') {
            $keep = defined $connection && $connection =~ /\bkeep-alive\b/i;
        } else {
            $self->_error_response($conn, 505, \%env); return;
        }

        # ---- request body
        my $input;
        my $te = $env{HTTP_TRANSFER_ENCODING};
        my $cl = $env{CONTENT_LENGTH};
        if (defined $te || (defined $cl && $cl ne '0')) {
            $input = $self->_read_body($conn, \$buf, \%env) or return;
        } else {
            if (defined $env{HTTP_EXPECT} && lc $env{HTTP_EXPECT} ne '100-continue') {
                $self->_error_response($conn, 417, \%env); return;
            }
            open $input, '<', \(my $empty = '');
        }
        $env{'psgi.input'} = $input;

        $self->{requests}++;
        my $max_req = $self->{max_requests};
        $keep = 0 if $$stopping || ($max_req && $self->{requests} >= $max_req);

        if ($harakiri) {
            $self->{current_request} = qq{"$env{REQUEST_METHOD} $env{REQUEST_URI} $proto" from $raddr};
            _worker_msg($self->{ready_w}, MSG_BUSY, $self->{current_request});
            alarm $harakiri;
        }

        # ---- the app
        my $st = { keep => $keep, head => $env{REQUEST_METHOD} eq 'HEAD', status => 0, bytes => 0, sent => 0 };
        my $res = eval { $app->(\%env) };
        if (!defined $res) {
            my $err = $@ || "app returned undef\n";
            print STDERR "$self->{name}: app error: $err";
            $res = [500, ['Content-Type' => 'text/plain'], ['Internal Server Error']];
        }
        if (ref $res eq 'ARRAY') {
            $self->_respond($conn, \%env, $st, $res);
        } elsif (ref $res eq 'CODE') {
            my $ok = eval {
                $res->(sub { $self->_respond($conn, \%env, $st, $_[0]) });
                1;
            };
            unless ($ok) {
                my $err = $@;
                die $err if $err =~ /^ForkServer::client-gone/;
                print STDERR "$self->{name}: app error: $err";
                if (!$st->{sent}) {
                    $self->_respond($conn, \%env, $st,
                        [500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
                } else {
                    $st->{keep} = 0;
                }
            }
            # A writer the app kept open cannot be finished later by a
            # blocking server: the response length is unknown, so close.
            $st->{keep} = 0 if !$st->{sent} || ($st->{writer} && !$st->{writer}{closed});
            unless ($st->{sent}) {
                $self->_respond($conn, \%env, $st,
                    [500, ['Content-Type' => 'text/plain'], ['No response']]);
            }
        } else {
            print STDERR "$self->{name}: app returned an invalid response\n";
            $self->_respond($conn, \%env, $st, [500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
        }
        if ($harakiri) { alarm 0; _worker_msg($self->{ready_w}, MSG_DONE) }

        $self->_access_log(\%env, $st->{status}, $st->{bytes}) if $self->{access_log};
        if ($env{'psgix.harakiri.commit'}) { $self->{harakiri_commit} = 1; return }
        return unless $st->{keep};
    }
}

sub _read_body {
    my ($self, $conn, $bufref, $env) = @_;
    my $te = $env->{HTTP_TRANSFER_ENCODING};
    my $cl = $env->{CONTENT_LENGTH};
    my $max = $self->{max_body_size};
    my $chunked;
    if (defined $te) {
        if ($te !~ /^\s*chunked\s*$/i) { $self->_error_response($conn, 501, $env); return }
        # Both headers: a request-smuggling shape (RFC 7230 3.3.3): refuse.
        if (defined $cl) { $self->_error_response($conn, 400, $env); return }
        $chunked = 1;
    } else {
        if ($cl !~ /^\d+$/) { $self->_error_response($conn, 400, $env); return }
        if ($max && $cl > $max) { $self->_error_response($conn, 413, $env); return }
    }
    if (defined(my $expect = $env->{HTTP_EXPECT})) {
        if (lc $expect ne '100-continue') { $self->_error_response($conn, 417, $env); return }
        _write_all($conn, "HTTP/1.1 100 Continue" . CRLF . CRLF)
            if $env->{SERVER_PROTOCOL} eq 'HTTP/1.1' && $$bufref eq '';
    }

    # The body goes to memory up to body_buffer_size, past it to an anonymous
    # temporary file; either way psgi.input is a seekable handle.
    my $limit = $self->{body_buffer_size};
    my $body = '';
    my $fh;
    my $total = 0;
    my $spill = sub {
        open $fh, '+>', undef or die "temporary file for request body: $!\n";
        binmode $fh;
        print $fh $body;
        $body = '';
    };

    if (!$chunked) {
        if ($cl <= $limit) {
            $body = substr($$bufref, 0, $cl, '');
            while (length $body < $cl) {
                unless (_fill($conn, \$body, $cl - length $body)) {
                    $self->_error_response($conn, 400, $env); return;
                }
            }
        } else {
            $spill->();
            my $left = $cl;
            my $take = substr($$bufref, 0, $left, '');
            print $fh $take; $left -= length $take;
            while ($left > 0) {
                my $chunk = '';
                unless (_fill($conn, \$chunk, $left < READ_CHUNK ? $left : READ_CHUNK)) {
                    $self->_error_response($conn, 400, $env); return;
                }
                print $fh $chunk; $left -= length $chunk;
            }
        }
    } else {
        while (1) {
            # chunk-size [; ext] CRLF
            my $line_end;
            while (($line_end = index($$bufref, "\012")) < 0) {
                if (length $$bufref > 4096 || !_fill($conn, $bufref)) { $self->_error_response($conn, 400, $env); return }
            }
            my $line = substr($$bufref, 0, $line_end + 1, '');
            unless ($line =~ /^([0-9a-fA-F]+)[ \t]*(?:;[^\015\012]*)?\015?\012\z/) {
                $self->_error_response($conn, 400, $env); return;
            }
            my $size = hex $1;
            if ($size == 0) {
                # trailer fields up to an empty line; dropped
                while (1) {
                    my $e;
                    while (($e = index($$bufref, "\012")) < 0) {
                        if (length $$bufref > 8192 || !_fill($conn, $bufref)) { $self->_error_response($conn, 400, $env); return }
                    }
                    my $t = substr($$bufref, 0, $e + 1, '');
                    last if $t =~ /^\015?\012\z/;
                }
                last;
            }
            $total += $size;
            if ($max && $total > $max) { $self->_error_response($conn, 413, $env); return }
            while (length $$bufref < $size + 2) {
                unless (_fill($conn, $bufref)) { $self->_error_response($conn, 400, $env); return }
            }
            my $data = substr($$bufref, 0, $size, '');
            unless (substr($$bufref, 0, 2, '') eq CRLF) { $self->_error_response($conn, 400, $env); return }
            if ($fh) { print $fh $data }
            else {
                $body .= $data;
                $spill->() if length $body > $limit;
            }
        }
        $env->{CONTENT_LENGTH} = $total;
        delete $env->{HTTP_TRANSFER_ENCODING};
    }

    if ($fh) {
        $fh->flush;
        seek $fh, 0, 0;
        return $fh;
    }
    open my $in, '<', \$body;
    return $in;
}

sub _write_informational {
    my ($conn, $code, $headers) = @_;
    my $msg = _status_line($code);
    my @h = @{ $headers || [] };
    while (my ($k, $v) = splice @h, 0, 2) { $msg .= "$k: $v" . CRLF }
    _write_all($conn, $msg . CRLF);
}

# Sends status line and headers, and the body if it is there; returns a
# writer for a streaming response (no body in $res).
sub _respond {
    my ($self, $conn, $env, $st, $res) = @_;
    die "ForkServer: response already sent\n" if $st->{sent}++;
    my ($status, $headers, $body) = @$res;
    $st->{status} = $status;

    my $no_entity = $status < 200 || $status == 204 || $status == 304;
    my $head = $st->{head};
    my ($cl, $te);
    my $out = _status_line($status);
    for (my $i = 0; $i < @$headers; $i += 2) {
        my $k = $headers->[$i];
        my $v = $headers->[$i + 1];
        if ($k =~ /^(?:content-length|transfer-encoding|connection)$/i) {
            my $lk = lc $k;
            if ($lk eq 'content-length') { $cl = $v }
            elsif ($lk eq 'transfer-encoding') { $te = $v }
            else { $st->{keep} = 0 if $v =~ /\bclose\b/i; next }   # we own Connection
        }
        $out .= "$k: $v" . CRLF;
    }

    # a stop or reload began while the app ran: this is the last response
    $st->{keep} = 0 if ${ $self->{stopping_ref} };
    my $chunked = 0;
    if (!$no_entity && !defined $cl && !defined $te) {
        if (ref $body eq 'ARRAY') {
            # Cheaper than chunking and keeps the connection reusable.
            my $len = 0;
            $len += length $_ for @$body;
            $out .= "Content-Length: $len" . CRLF;
        } elsif ($env->{SERVER_PROTOCOL} eq 'HTTP/1.1') {
            $chunked = 1;
            $out .= "Transfer-Encoding: chunked" . CRLF;
        } else {
            $st->{keep} = 0;   # HTTP/1.0: the end of the body is the close
        }
    } elsif (defined $te) {
        $st->{keep} = 0;       # the app chunks itself: we cannot tell its end
    }

    _tick();
    $out .= "Date: $http_date" . CRLF;
    if (!$st->{keep}) { $out .= "Connection: close" . CRLF }
    elsif ($env->{SERVER_PROTOCOL} eq 'HTTP/1.0') { $out .= "Connection: keep-alive" . CRLF }
    $out .= CRLF;

    my $send_body = !$head && !$no_entity;

    if (ref $body eq 'ARRAY') {
        # The common case in one write(2).
        if ($send_body) {
            my $b = join '', @$body;
            $st->{bytes} = length $b;
            $out .= $b;
        }
        _write_all($conn, $out);
        return;
    }
    if (defined $body) {
        _write_all($conn, $out);
        my $bytes = 0;
        if ($send_body) {
            # A file handle or an object with getline() and close().
            local $/ = \READ_CHUNK;
            while (defined(my $b = $body->getline)) {
                next unless length $b;
                $bytes += length $b;
                _write_all($conn, $chunked ? sprintf('%x', length $b) . CRLF . $b . CRLF : $b);
            }
            _write_all($conn, "0" . CRLF . CRLF) if $chunked;
        }
        $body->close;
        $st->{bytes} = $bytes;
        return;
    }
    _write_all($conn, $out);
    my $w = ForkServer::HTTPServer::Writer->_new($conn, $st, $chunked && $send_body, $send_body);
    $st->{writer} = $w;
    return $w;
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
        heartbeat    => 0,
        idle         => 0,
        access_log   => \*STDERR,       # undef: none
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
body larger than C<max_body_size> 413.

The environment has C<psgi.streaming> (delayed responses and writers),
C<psgix.harakiri> (set C<psgix.harakiri.commit> to end the worker after the
response), C<psgix.informational> and C<psgix.io>; C<psgi.multiprocess> is
true and C<psgi.nonblocking> false.

=head1 CONSTRUCTOR OPTIONS

=over

=item listen_sock, or host and port

A bound, listening socket; or where to bind one (backlog C<listen_backlog>,
default 1024).

=item app

The PSGI application (code reference). Required.

=item workers

Number of prefork workers (default 1). A worker that dies is respawned; one
that dies within a second of its birth three times in a row is respawned
with a growing delay (up to 5 s).

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

=item access_log

A file handle for the access log, one line per request in common log
format with the vassal's name as first field. Default STDERR; C<undef>: no
log.

=item mercy

Seconds a graceful stop waits for in-flight requests before SIGKILL.

=item max_header_size, max_body_size, body_buffer_size

Limits: 8192, 0 (no limit) and 65536 bytes by default.

=item read_timeout, keepalive_timeout

Seconds a client may stay silent in the middle of a request (30) and
between requests on a keep-alive connection (1).

=item server_ready

A code reference called once in the master when it listens, with
C<{ host, port, server_software }> (as Plack handlers do).

=back

=head1 SIGNALS

Master: SIGHUP graceful reload; SIGTERM graceful stop; SIGINT and SIGQUIT
stop now. Workers: SIGTERM ends an idle worker at once (at most a second
later) and a busy one after its request; a connection the worker has
accepted is always answered.

=cut
