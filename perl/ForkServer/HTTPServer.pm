package ForkServer::HTTPServer;
use strict;
use warnings;

# Everything the master and the workers will ever need is loaded here, at
# `use` time, in the base vassal: an adopted vassal forks with these pages
# already compiled and shared, and run() loads nothing.
use Carp ();
use Config ();
use Errno qw(EINTR EAGAIN ECONNABORTED);
use Fcntl ();
use POSIX ();
use Socket qw(IPPROTO_TCP TCP_NODELAY SOL_SOCKET SO_RCVTIMEO SO_SNDTIMEO SO_REUSEADDR
              AF_INET AF_INET6 AF_UNSPEC SOCK_STREAM AI_PASSIVE MSG_DONTWAIT
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
use ForkServer::EmperorPipe ();
use ForkServer::Log ();
use ForkServer::Protocol qw(:vassal_bytes :emperor_bytes);    # the Emperor pipe's bytes

our $VERSION = '0.01';

use constant {
    MSG_ACCEPTING => 1,    # worker -> master: I am in accept()
    MSG_ACTIVITY  => 2,    # worker -> master: a request arrived (for `idle`)
    MSG_BUSY      => 3,    # worker -> master: in a request (harakiri only), payload: request
    MSG_DONE      => 4,    # worker -> master: request finished (harakiri only)
    MSG_LEAVING   => 5,    # worker -> master: recycling; accepts nothing more, replace me now
    EXIT_HARAKIRI => 86,   # worker exit status after harakiri
    EXIT_RECYCLE  => 0,
    READ_CHUNK    => 65536,
    MAX_CONNS     => 512,  # connections one worker holds open (idle and partial heads cost no worker time)
    CRLF          => "\015\012",
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
        stop_grace       => 1,        # a stopping worker waits this long for a request already on its way on an idle connection
        socket_timeout   => 4,        # longest single stall of a read or write (uWSGI's socket-timeout)
        listen_backlog   => 1024,
        %args,
    }, $class;
    # read_timeout: the name before the deadlines existed
    $self->{socket_timeout} = $args{read_timeout} if defined $args{read_timeout} && !defined $args{socket_timeout};
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

    # A spare's first worker (ForkServer::Spares) exists already, with these pipes.
    my $pre = delete $self->{preforked};
    my ($ready_r, $ready_w);
    if ($pre) { ($ready_r, $ready_w) = @$pre{qw(ready_r ready_w)} }
    else      { pipe($ready_r, $ready_w) or die "pipe: $!" }
    $self->{ready_r} = $ready_r;
    $self->{ready_w} = $ready_w;
    $self->{master_pid} = $$;
    $self->{gen} = 1;
    $self->_open_requests_file(shared => $pre ? 1 : 0);
    $self->{kids} = {};        # pid => { slot, gen, ready, born }
    $self->{slot_fast_deaths} = {};
    $self->{respawn} = {};     # slot => time
    if ($pre) { @$self{qw(stop_r stop_w)} = @$pre{qw(stop_r stop_w)} }
    else      { $self->_new_stop_pipe }
    $self->{sent_accepting} = 0;
    $self->{sent_loyal} = 0;
    $self->{stopping} = 0;     # 0, 'graceful' or 'now'
    my $efh = $self->{emperor_fh};
    $self->{emperor_open} = $efh ? 1 : 0;

    $self->{server_ready}->({
        host => $self->{server_name}, port => $self->{server_port},
        server_software => 'ForkServer',
    }) if $self->{server_ready};

    $self->{kids}{ $pre->{pid} } = { slot => 1, gen => 1, ready => 0, born => _now() } if $pre;
    $self->_spawn_worker($_) for ($pre ? 2 : 1) .. $self->{workers};

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
                        $self->_log("harakiri: worker $k->{slot} (pid $pid) stuck more than ${h}s in $k->{request}, killed by the master");
                        kill 'KILL', $pid;
                        delete $k->{busy_since};
                    } elsif ($at - $now < $timeout) { $timeout = $at - $now }
                }
            }
            for my $pid (keys %{ $self->{kids} }) {
                my $at = $self->{kids}{$pid}{kill_at} // next;
                if ($at <= $now) {
                    $self->_log("worker pid $pid still busy $self->{mercy}s after reload, killed");
                    kill 'KILL', $pid;
                    $self->{kids}{$pid}{kill_at} = $now + 3600;
                } elsif ($at - $now < $timeout) { $timeout = $at - $now }
            }
            if ($hb && $self->{sent_accepting}) {
                $next_hb //= $now;
                if ($now >= $next_hb) {
                    ForkServer::EmperorPipe->send($self->{emperor_fh}, HEARTBEAT);
                    $next_hb = $now + $hb;
                }
                $timeout = $next_hb - $now if $next_hb - $now < $timeout;
            }
            if ($self->{idle} > 0 && !$self->{idle_sent}) {
                my $at = $self->{last_activity} + $self->{idle};
                if ($now >= $at) {
                    ForkServer::EmperorPipe->send($self->{emperor_fh}, DONE);    # idle: put me back to sleep
                    $self->{idle_sent} = 1;
                }
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
                # The Emperor is gone (CONTRACT.md): graceful stop, and
                # nobody is left to stop this vassal's helpers but us.
                $self->{emperor_open} = 0;
                $self->{emperor_vanished} = 1 unless $self->{stopping};
                $kill_at = $self->_begin_graceful_stop($kill_at);
            } elsif ($got) {
                for my $b (unpack 'C*', $bytes) {
                    if ($b == STOP_NOW) { $sig{INT} = 1 }
                    elsif ($b == RELOAD) { $sig{HUP} = 1 }
                    elsif ($b == STOP) { $sig{TERM} = 1 }
                }
            } elsif ($! != EINTR && $! != EAGAIN) {
                $self->{emperor_open} = 0;
                $kill_at = $self->_begin_graceful_stop($kill_at);
            }
        }
    }

    $self->_reap_blocking;
    unlink $self->{requests_file} if $self->{requests_file};
    $self->_end_session if $self->{emperor_vanished};
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
    if (sockaddr_family($name) == AF_INET6) {
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


# One line on stderr in the vassal's one format (ForkServer::Log), whatever
# the app did to warn() or STDERR's buffer.
sub _log { ForkServer::Log::line($_[0]{name}, $_[1]) }

sub _spawn_worker {
    my ($self, $slot) = @_;
    # Signals stay blocked across fork() until the worker has its own
    # handlers: a SIGTERM sent to a newborn worker would otherwise hit the
    # master's inherited flag-setting handler and be lost.
    my $old = POSIX::SigSet->new;
    POSIX::sigprocmask(POSIX::SIG_BLOCK(), $BLOCK_SET, $old);
    my $pid = fork;
    unless (defined $pid) {
        $self->_log("fork failed: $!");
        POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
        $self->{respawn}{$slot} = _now() + 1;
        return;
    }
    if ($pid == 0) {
        $self->{sigmask} = $old;
        close delete $self->{stop_w};
        my $code = eval { $self->_worker_main($slot); 0 };
        unless (defined $code) { $self->_log("worker $slot: $@"); $code = 1 }
        _worker_exit($code);
    }
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), $old);
    $self->{kids}{$pid} = { slot => $slot, gen => $self->{gen}, ready => 0, born => _now() };
    return $pid;
}

=head2 run_preforked_worker(slot => 1, master_pid => $pid, ready_r => $fh, ready_w => $fh, stop_r => $fh)

The entry point of a worker forked before its master ran (a spare's first
worker, L<ForkServer::Spares>): the same worker as one that C<run()>
forks, given the master's pipes (the master gets them as
C<preforked =E<gt> { pid, ready_r, ready_w, stop_r, stop_w }> in C<new>).
Does not return.

=cut

sub run_preforked_worker {
    my ($self, %args) = @_;
    $self->_setup_listener;
    $self->{$_} = $args{$_} for qw(master_pid ready_r ready_w stop_r);
    $self->{gen} = 1;
    $self->_open_requests_file(master => $args{master_pid}, shared => 1);
    $self->{sigmask} = POSIX::SigSet->new;
    my $code = eval { $self->_worker_main($args{slot}); 0 };
    unless (defined $code) { warn "$self->{name}: worker $args{slot}: $@"; $code = 1 }
    _worker_exit($code);
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
            $self->{slot_fast_deaths}{$k->{slot}} = 0;
            unless ($self->{sent_accepting}) {
                $self->{sent_accepting} = 1;
                ForkServer::EmperorPipe->send($self->{emperor_fh}, ACCEPTING);
            }
            if (!$self->{sent_loyal} && !$self->{stopping}) {
                my $ready = grep { $_->{ready} && $_->{gen} == $self->{gen} } values %{ $self->{kids} };
                if ($ready >= $self->{workers}) {
                    $self->{sent_loyal} = 1;
                    ForkServer::EmperorPipe->send($self->{emperor_fh}, LOYAL);
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
        } elsif ($type == MSG_LEAVING) {
            my $k = $self->{kids}{$pid} or next;
            next if $k->{replaced} || $self->{stopping} || $k->{gen} != $self->{gen};
            $k->{replaced} = 1;
            $self->_spawn_worker($k->{slot});
        }
    }
}

sub _reap {
    my $self = shift;
    while ((my $pid = waitpid(-1, POSIX::WNOHANG())) > 0) {
        my $status = $?;
        my $k = delete $self->{kids}{$pid} or next;   # not a worker (an app's child)
        next if $self->{stopping} || $k->{gen} != $self->{gen} || $k->{replaced};
        my $slot = $k->{slot};
        my $code = $status >> 8;
        my $intended = !($status & 127) && ($code == EXIT_RECYCLE || $code == EXIT_HARAKIRI);
        if (!$intended) {
            $self->_log(sprintf("worker %d (pid %d) died (%s), respawning", $slot, $pid,
                                ($status & 127) ? "signal " . ($status & 127) : "exit $code"));
        }
        # A worker that dies young, again and again, before it ever accepts
        # is crash-looping: back off instead of forking flat out. One that
        # died serving a request (a poisoned route) is replaced at once:
        # backing off there left a vassal with no worker at all.
        if (!$intended && !$k->{ready} && _now() - $k->{born} < 1) {
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
    # The old generation's stop pipe reaches end of file: no signal, so an
    # app's blocking call in a busy worker is never interrupted.
    $self->_new_stop_pipe;
    $self->_spawn_worker($_) for 1 .. $self->{workers};
}

sub _begin_graceful_stop {
    my ($self, $kill_at) = @_;
    return $kill_at if $self->{stopping};
    $self->{stopping} = 'graceful';
    close delete $self->{stop_w} if $self->{stop_w};
    close delete $self->{stop_r} if $self->{stop_r};
    return _now() + $self->{mercy};
}

# Workers learn that they should stop from their generation's pipe reaching
# end of file (the master closed it, or died), never from a signal that
# would interrupt the app they are running.
sub _new_stop_pipe {
    my $self = shift;
    close delete $self->{stop_w} if $self->{stop_w};
    close delete $self->{stop_r} if $self->{stop_r};
    pipe(my $r, my $w) or die "pipe: $!";
    @$self{qw(stop_r stop_w)} = ($r, $w);
}

# The Emperor died without stopping us: whatever the app left in this
# vassal's session (helpers double-forked without setsid) goes with it, as
# the Emperor would have done. Only a session leader does this: under
# plackup the session is the user's terminal.
sub _end_session {
    my $self = shift;
    my $sid = _session_of($$) // return;
    return unless $sid == $$;
    my @left = grep { $_ != $$ && (_session_of($_) // 0) == $sid } _all_pids();
    return unless @left;
    $self->_log("the Emperor is gone; stopping " . scalar(@left) . " process(es) left in the vassal's session");
    kill 'TERM', @left;
    my $until = _now() + 2;
    while (_now() < $until) {
        1 while waitpid(-1, POSIX::WNOHANG()) > 0;
        @left = grep { kill 0, $_ and (_session_of($_) // 0) == $sid } @left;
        last unless @left;
        select(undef, undef, undef, 0.05);
    }
    kill 'KILL', @left if @left;
    1 while waitpid(-1, POSIX::WNOHANG()) > 0;
}

sub _all_pids {
    opendir my $d, '/proc' or return;
    return grep { /^\d+\z/ } readdir $d;
}

# Session id from /proc/PID/stat (Perl's POSIX has no getsid).
sub _session_of {
    my $pid = shift;
    open my $fh, '<', "/proc/$pid/stat" or return undef;
    my $s = <$fh> // return undef;
    # pid (comm) state ppid pgrp session: comm may hold spaces and parentheses
    return $s =~ /\)\s+\S+\s+-?\d+\s+-?\d+\s+(-?\d+)/ ? $1 : undef;
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

    # The master asks a worker to stop by closing its generation's stop
    # pipe (end of file in the worker's select), not by a signal. A SIGTERM
    # from elsewhere only sets the same flag, with SA_RESTART, so that the
    # app's blocking reads are restarted, not broken with EINTR.
    my $stopping = 0;
    my $on_term = POSIX::SigAction->new(sub { $stopping = 1 }, POSIX::SigSet->new, POSIX::SA_RESTART());
    $on_term->safe(1);
    POSIX::sigaction(POSIX::SIGTERM(), $on_term);
    $SIG{HUP}  = 'IGNORE';          # the master reloads; a worker keeps going
    $SIG{INT}  = 'DEFAULT';
    $SIG{QUIT} = 'DEFAULT';
    $SIG{CHLD} = 'DEFAULT';
    $SIG{PIPE} = 'IGNORE';          # a vanished client is an EPIPE, not a death
    $self->{stopping_ref} = \$stopping;
    POSIX::sigprocmask(POSIX::SIG_SETMASK(), delete $self->{sigmask});
    _worker_exit(0) if getppid() != $master;

    close $self->{ready_r};
    if (my $efh = $self->{emperor_fh}) {
        # The Emperor pipe belongs to the master alone: a worker holding it
        # would hide the master's death from the Emperor.
        close $efh;
        delete $self->{emperor_fh};
    }
    $0 = "$self->{proctitle} worker $slot" if length $self->{proctitle};
    $self->_open_requests_slot($slot);

    if (my $h = $self->{harakiri}) {
        $SIG{ALRM} = sub {
            my $req = $self->{current_request} // '(unknown request)';
            $self->_log("harakiri: worker $slot (pid $$) stuck more than ${h}s in $req, killed");
            _worker_exit(EXIT_HARAKIRI);
        };
    }

    $self->{requests} = 0;
    my $listen = $self->{listen_sock};
    # Every worker waits for the listener in select() beside its own
    # connections; the one that loses the race to accept() gets EAGAIN.
    IO::Handle::blocking($listen, 0);
    my $lfd = fileno $listen;
    my $stop_fd = fileno $self->{stop_r};
    _worker_msg($self->{ready_w}, MSG_ACCEPTING);

    my $stimeo = pack('l!l!', $self->{socket_timeout}, 0);
    # Connections this worker holds: idle keep-alive ones and ones whose
    # head is still arriving cost a select() slot, not the worker. Only a
    # complete head makes the worker busy, so a slow or idle client never
    # keeps the others waiting.
    my %conns;
    my %pending;        # fd => 1: a complete head may already be buffered
    my $leaving = 0;    # stop, recycle or harakiri commit: accept nothing more
    my $stop_seen_at;
    while (1) {
        my $now = _now();
        if ($stopping && !$leaving) { $leaving = 1 }
        if ($leaving) {
            # Idle connections are closed only when nothing has arrived for
            # stop_grace: a request the client sent right after its last
            # response is served (with Connection: close), never dropped.
            $stop_seen_at //= $now;
            for my $fd (keys %conns) {
                my $c = $conns{$fd};
                next if length $c->{buf} || $pending{$fd};
                if ($now - $stop_seen_at >= $self->{stop_grace}) {
                    _drop_conn(\%conns, \%pending, $fd);
                }
            }
            last unless %conns;
        }

        my $timeout = %pending ? 0 : 1;
        my $rin = '';
        vec($rin, $stop_fd, 1) = 1 unless $leaving;
        vec($rin, $lfd, 1) = 1 if !$leaving && keys %conns < MAX_CONNS;
        for my $fd (keys %conns) {
            my $c = $conns{$fd};
            if ($c->{deadline} <= $now) {
                # A head that did not arrive in time gets 408; an idle
                # keep-alive connection is just closed.
                $self->_error_response($c->{sock}, 408) if length $c->{buf};
                _drop_conn(\%conns, \%pending, $fd);
                next;
            }
            vec($rin, $fd, 1) = 1;
            my $left = $c->{deadline} - $now;
            $timeout = $left if $left < $timeout;
        }
        if ($leaving) {
            my $left = $stop_seen_at + $self->{stop_grace} - $now;
            $timeout = $left if $left < $timeout;
            $timeout = 0 if $timeout < 0;
        }
        $self->_flush_requests if $self->{requests_dirty};
        my $n = select(my $rout = $rin, undef, undef, $timeout);
        if ($n < 0) {
            next if $! == EINTR;
            die "select: $!\n";
        }
        my %ready = %pending;
        %pending = ();
        if ($n > 0) {
            if (!$leaving && vec($rout, $stop_fd, 1)) { $stopping = 1; $leaving = 1 }
            if (!$leaving && vec($rout, $lfd, 1)) {
                if (my $c = $self->_accept($listen, $stimeo)) {
                    my $fd = fileno $c->{sock};
                    $conns{$fd} = $c;
                    # Linux defers accept until data arrived only with
                    # TCP_DEFER_ACCEPT; try a read at once anyway, the head
                    # is usually there already.
                    $ready{$fd} = 1;
                }
            }
            for my $fd (keys %conns) { $ready{$fd} = 1 if vec($rout, $fd, 1) }
        }
        # One request per ready connection per round: fair between them.
        for my $fd (sort { $a <=> $b } keys %ready) {
            my $c = $conns{$fd} or next;
            # never blocks: a pending connection may have nothing new
            my $got = recv($c->{sock}, my $more, READ_CHUNK, MSG_DONTWAIT);
            if (defined $got) { $got = length $more; $c->{buf} .= $more }
            if (!defined $got) {
                if ($! == EAGAIN || $! == EINTR) {
                    next unless length $c->{buf};
                } else {
                    _drop_conn(\%conns, \%pending, $fd); next;
                }
            } elsif ($got == 0) {
                # end of file: a request already buffered is still answered
                $c->{eof} = 1;
                unless (length $c->{buf}) { _drop_conn(\%conns, \%pending, $fd); next }
            }
            next unless length $c->{buf};
            if (!$c->{in_head}) {
                # first byte of the next request: its head's deadline starts
                $c->{in_head} = 1;
                $c->{deadline} = _now() + $self->{header_timeout};
            }
            my $keep = eval { $self->_serve_head($c) };
            if (!defined $keep) {
                $self->_log($@) if $@ && $@ !~ /^ForkServer::client-gone/;
                _drop_conn(\%conns, \%pending, $fd);
            } elsif ($keep eq 'partial') {
                _drop_conn(\%conns, \%pending, $fd) if $c->{eof};
                next;
            } elsif (!$keep) {
                _drop_conn(\%conns, \%pending, $fd);
            } else {
                # Served, connection kept: idle until the next byte, and
                # pipelined bytes already here are looked at next round.
                $c->{in_head} = 0;
                $c->{deadline} = _now() + $self->{keepalive_timeout};
                if ($c->{eof} && !length $c->{buf}) {
                    _drop_conn(\%conns, \%pending, $fd);
                } elsif (length $c->{buf}) {
                    $c->{in_head} = 1;
                    $c->{deadline} = _now() + $self->{header_timeout};
                    $pending{$fd} = 1;
                }
            }
            if (!$leaving && ($self->{harakiri_commit}
                || ($self->{max_requests} && $self->{requests} >= $self->{max_requests}))) {
                # The replacement starts now, not when this worker has
                # finished with its other connections. It goes on from this
                # worker's requests slot: written first.
                $self->_flush_requests if $self->{requests_dirty};
                _worker_msg($self->{ready_w}, MSG_LEAVING);
                $leaving = 1;
            }
        }
    }
    $self->_flush_requests if $self->{requests_dirty};
    _worker_exit(EXIT_RECYCLE);
}

# Has the master closed this generation's stop pipe (or a SIGTERM come)?
sub _stop_asked {
    my $self = shift;
    my $flag = $self->{stopping_ref};
    return 1 if $$flag;
    my $r = $self->{stop_r} or return 0;
    my $rin = '';
    vec($rin, fileno $r, 1) = 1;
    $$flag = 1 if select($rin, undef, undef, 0) > 0;
    return $$flag;
}

sub _drop_conn {
    my ($conns, $pending, $fd) = @_;
    my $c = delete $conns->{$fd} or return;
    delete $pending->{$fd};
    close $c->{sock};
}

sub _accept {
    my ($self, $listen, $stimeo) = @_;
    my $peer = accept(my $conn, $listen);
    unless ($peer) {
        return undef if $! == EINTR || $! == EAGAIN || $! == ECONNABORTED;
        # EMFILE, ENOBUFS...: transient pressure; don't spin, don't die
        $self->_log("accept: $!");
        select(undef, undef, undef, 0.1);
        return undef;
    }
    # Per connection, not per request: no Nagle delay on split writes; no
    # single read or write stalls longer than socket_timeout.
    setsockopt($conn, IPPROTO_TCP, TCP_NODELAY, 1);
    setsockopt($conn, SOL_SOCKET, SO_RCVTIMEO, $stimeo);
    setsockopt($conn, SOL_SOCKET, SO_SNDTIMEO, $stimeo);
    my ($rport, $raddr) = (0, '');
    my $fam = sockaddr_family($peer);
    if ($fam == AF_INET) {
        ($rport, $raddr) = unpack_sockaddr_in($peer);
        $raddr = inet_ntop(AF_INET, $raddr);
    } elsif ($fam == AF_INET6) {
        ($rport, $raddr) = unpack_sockaddr_in6($peer);
        $raddr = inet_ntop(AF_INET6, $raddr);
    }
    return {
        sock => $conn, buf => '', raddr => $raddr, rport => $rport, in_head => 1,
        deadline => _now() + $self->{header_timeout},
        informational => sub { _write_informational($conn, @_) },
    };
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

# Where the current phase's deadline ends (body read, response write).
our $DEADLINE = 0;

sub _write_all {
    my ($conn, $data) = @_;
    my $len = length $data;
    my $off = 0;
    while ($off < $len) {
        my $n = syswrite($conn, $data, $len - $off, $off);
        if (!defined $n) {
            next if $! == EINTR;
            die "ForkServer::client-gone: write: " . ($! == EAGAIN ? 'stalled past socket_timeout' : $!) . "\n";
        }
        $off += $n;
        # Each write blocks at most socket_timeout (SO_SNDTIMEO); the whole
        # response is bounded by its own deadline.
        die "ForkServer::client-gone: write: response deadline passed\n"
            if $off < $len && $DEADLINE && _now() > $DEADLINE;
    }
    return $len;
}

# Reads more bytes into $$bufref before $DEADLINE; returns the count; 0
# means EOF, a stall past socket_timeout or the deadline passed.
sub _fill {
    my ($conn, $bufref, $want) = @_;
    while (1) {
        if ($DEADLINE) {
            my $left = $DEADLINE - _now();
            return 0 if $left <= 0;
            my $rin = '';
            vec($rin, fileno $conn, 1) = 1;
            my $n = select(my $rout = $rin, undef, undef, $left);
            if ($n < 0) { next if $! == EINTR; return 0 }
            return 0 if $n == 0;
        }
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

# RFC 9112: a field line is a token, a colon, a value. Whitespace before the
# colon, obs-fold continuation lines and anything else are refused, so no
# proxy in front can read the head differently from us.
my $TOKEN = qr/[!#\$%&'*+.^_`|~0-9A-Za-z-]+/;
my $HEAD_RE = qr/\A[^\012]*\012(?:$TOKEN:[^\012]*\012)*\015?\012\z/;

# A complete head is in $c->{buf}: serve that one request. Returns 'partial'
# while the head is incomplete, 1 to keep the connection, 0 to close it;
# dies (ForkServer::client-gone) when the client vanished.
sub _serve_head {
    my ($self, $c) = @_;
    my $t0 = _now();    # the head is complete: the request's latency starts
    my $conn = $c->{sock};
    my %env = (
        SCRIPT_NAME         => '',
        SERVER_NAME         => $self->{server_name},
        SERVER_PORT         => $self->{server_port},
        REMOTE_ADDR         => $c->{raddr},
        REMOTE_PORT         => $c->{rport},
        @CONSTANT_ENV,
        'psgix.harakiri'    => 1,
        'psgix.informational' => $c->{informational},
        'psgix.io'          => $conn,
        'psgix.cleanup'     => 1,
        'psgix.cleanup.handlers' => [],
    );
    my $hlen = parse_http_request($c->{buf}, \%env);
    if ($hlen == -2) {
        if (length $c->{buf} > $self->{max_header_size}) { $self->_error_response($conn, 431); return 0 }
        return 'partial';
    }
    if ($hlen == -1) {
        # A well-formed request line in a version we do not speak: 505.
        my $status = $c->{buf} =~ m{\A$TOKEN [^ \015\012]+ HTTP/(\d+)\.(\d+)\015?\012} && $1 ne '1' ? 505 : 400;
        $self->_error_response($conn, $status);
        return 0;
    }
    if ($hlen > $self->{max_header_size}) { $self->_error_response($conn, 431, \%env); return 0 }
    my $head = substr($c->{buf}, 0, $hlen, '');
    if ($head !~ $HEAD_RE || $env{REQUEST_METHOD} !~ /\A$TOKEN\z/) {
        $self->_error_response($conn, 400, \%env); return 0;
    }

    if ($self->{idle} > 0) {
        my $t = time;
        if ($t != ($self->{last_note} // 0)) {
            _worker_msg($self->{ready_w}, MSG_ACTIVITY);
            $self->{last_note} = $t;
        }
    }

    my $proto = $env{SERVER_PROTOCOL};
    my $connection = $env{HTTP_CONNECTION};
    my $keep;
    if ($proto eq 'HTTP/1.1') {
        $keep = !(defined $connection && $connection =~ /\bclose\b/i);
        # one Host, and only one (the parser joins repeats with ", ")
        my $host = $env{HTTP_HOST};
        if (!defined $host || $host =~ /,/) { $self->_error_response($conn, 400, \%env); return 0 }
    } elsif ($proto eq 'HTTP/1.0') {
        $keep = defined $connection && $connection =~ /\bkeep-alive\b/i;
        if (defined $env{HTTP_HOST} && $env{HTTP_HOST} =~ /,/) { $self->_error_response($conn, 400, \%env); return 0 }
    } else {
        $self->_error_response($conn, 505, \%env); return 0;
    }

    # ---- request body, under its own deadline
    my $input;
    my $te = $env{HTTP_TRANSFER_ENCODING};
    my $cl = $env{CONTENT_LENGTH};
    if (defined $te || (defined $cl && $cl ne '0')) {
        local $DEADLINE = _now() + $self->{body_timeout};
        $input = $self->_read_body($conn, \$c->{buf}, \%env) or return 0;
    } else {
        if (defined $env{HTTP_EXPECT} && lc $env{HTTP_EXPECT} ne '100-continue') {
            $self->_error_response($conn, 417, \%env); return 0;
        }
        open $input, '<', \(my $empty = '');
    }
    $env{'psgi.input'} = $input;

    $self->{requests}++;
    my $max_req = $self->{max_requests};
    $keep = 0 if ${ $self->{stopping_ref} } || ($max_req && $self->{requests} >= $max_req);

    # ---- the app and the response. Harakiri covers exactly this, and is
    # disarmed however it ends: a response write that failed used to leave
    # the alarm running into the next request, which it then killed.
    my $harakiri = $self->{harakiri};
    my $st = { keep => $keep, head => $env{REQUEST_METHOD} eq 'HEAD', status => 0, bytes => 0, sent => 0 };
    if ($harakiri) {
        $self->{current_request} = qq{"$env{REQUEST_METHOD} $env{REQUEST_URI} $proto" from $c->{raddr}};
        _worker_msg($self->{ready_w}, MSG_BUSY, $self->{current_request});
        alarm $harakiri;
    }
    my $ok = eval { $self->_run_app($conn, \%env, $st); 1 };
    my $err = $@;
    if ($harakiri) { alarm 0; _worker_msg($self->{ready_w}, MSG_DONE) }
    $self->_count_request(_now() - $t0) if $self->{requests_slot} && ($ok || $st->{sent});
    $self->_access_log(\%env, $st->{status}, $st->{bytes}) if $self->{access_log} && ($ok || $st->{sent});
    $self->_run_cleanup(\%env);
    die $err unless $ok;
    if ($env{'psgix.harakiri.commit'}) { $self->{harakiri_commit} = 1; return 0 }
    return $st->{keep} ? 1 : 0;
}

# Requests served, for the Emperor's status (docs/CONTRACT.md): the master
# creates $PSGI_FORKSERVER_RUN_DIR/requests-PID (its own pid, the one the
# Emperor knows); each worker owns one 16-byte slot of it, two
# little-endian u64: requests served, their latency summed in microseconds.
# The worker writes its slot once per round of its loop (before select:
# one write for all the requests of the round, and never a count left
# behind when it goes idle); a respawned worker goes on from its slot's
# numbers, and a reload's new generation uses the other half of the file
# (the old one may still be finishing its requests). The Emperor sums the
# slots. Without the variable (not under our Emperor) nothing is written.
use constant REQUESTS_SLOT => 16;

sub _open_requests_file {
    my ($self, %o) = @_;
    my $dir = $ENV{PSGI_FORKSERVER_RUN_DIR};
    return unless defined $dir && length $dir && -d $dir;
    my $path = "$dir/requests-" . ($o{master} // $$);
    # A spare's first worker may open it first (and count) before its
    # master gets here: then neither truncates.
    sysopen(my $fh, $path, Fcntl::O_WRONLY() | Fcntl::O_CREAT() | ($o{shared} ? 0 : Fcntl::O_TRUNC()), 0600)
        or return;
    close $fh;
    $self->{requests_file} = $path;
}

sub _open_requests_slot {
    my ($self, $slot) = @_;
    my $path = $self->{requests_file} or return;
    sysopen(my $fh, $path, Fcntl::O_RDWR()) or return;
    my $index = ($self->{gen} % 2) * $self->{workers} + $slot - 1;
    my $off = $index * REQUESTS_SLOT;
    my ($n, $us) = (0, 0);
    if (sysseek($fh, $off, 0) && (sysread($fh, my $rec, REQUESTS_SLOT) // 0) == REQUESTS_SLOT) {
        ($n, $us) = unpack 'Q<Q<', $rec;
    }
    $self->{requests_slot} = { fh => $fh, off => $off, n => $n, us => $us };
}

sub _count_request {
    my ($self, $seconds) = @_;
    my $r = $self->{requests_slot};
    $r->{n}++;
    $r->{us} += int($seconds * 1e6 + 0.5);
    $self->{requests_dirty} = 1;
}

sub _flush_requests {
    my $self = shift;
    my $r = $self->{requests_slot};
    $self->{requests_dirty} = 0;
    sysseek($r->{fh}, $r->{off}, 0) and syswrite($r->{fh}, pack('Q<Q<', $r->{n}, $r->{us}));
}

# psgix.cleanup: the handlers run after the response is out, before the
# worker looks at its next request.
sub _run_cleanup {
    my ($self, $env) = @_;
    my $handlers = $env->{'psgix.cleanup.handlers'};
    return unless $handlers && @$handlers;
    for my $h (@$handlers) {
        eval { $h->($env); 1 } or $self->_log("cleanup handler error: $@");
    }
}

sub _run_app {
    my ($self, $conn, $env, $st) = @_;
    local $DEADLINE = 0;
    my $res = eval { $self->{app}->($env) };
    if (!defined $res) {
        my $err = $@ || "app returned undef\n";
        $self->_log("app error: $err");
        $res = [500, ['Content-Type' => 'text/plain'], ['Internal Server Error']];
    }
    # The response has a whole deadline from its first byte.
    my $respond = sub {
        local $DEADLINE = $st->{deadline} = _now() + $self->{response_timeout};
        $self->_respond($conn, $env, $st, $_[0]);
    };
    if (ref $res eq 'ARRAY') {
        $respond->($res);
    } elsif (ref $res eq 'CODE') {
        my $ok = eval { $res->(sub { $respond->($_[0]) }); 1 };
        unless ($ok) {
            my $err = $@;
            die $err if $err =~ /^ForkServer::client-gone/;
            $self->_log("app error: $err");
            if (!$st->{sent}) {
                $respond->([500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
            } else {
                $st->{keep} = 0;
            }
        }
        # A writer the app kept open cannot be finished later by a
        # blocking server: the response length is unknown, so close.
        $st->{keep} = 0 if !$st->{sent} || ($st->{writer} && !$st->{writer}{closed});
        unless ($st->{sent}) {
            $respond->([500, ['Content-Type' => 'text/plain'], ['No response']]);
        }
    } else {
        $self->_log("app returned an invalid response");
        $respond->([500, ['Content-Type' => 'text/plain'], ['Internal Server Error']]);
    }
}

# Body framing checks, then the body into memory or a temporary file as it
# arrives: no chunk is ever held whole, whatever size it announces.
sub _read_body {
    my ($self, $conn, $bufref, $env) = @_;
    my $te = $env->{HTTP_TRANSFER_ENCODING};
    my $cl = $env->{CONTENT_LENGTH};
    my $max = $self->{max_body_size};
    my $chunked;
    if (defined $te) {
        if ($te !~ /^\s*chunked\s*$/i) { $self->_error_response($conn, 501, $env); return }
        # Both headers: a request-smuggling shape (RFC 9112 6.3): refuse.
        if (defined $cl) { $self->_error_response($conn, 400, $env); return }
        $chunked = 1;
    } else {
        if ($cl !~ /^\d+$/) { $self->_error_response($conn, 400, $env); return }
        # past 2**50 the number is not a length we could ever read: refuse
        # at once (it used to wait for the read timeout)
        $cl =~ s/^0+(?=\d)//;
        if (length $cl > 15 || ($max && $cl > $max)) { $self->_error_response($conn, 413, $env); return }
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
    my $store = sub {
        if ($fh) { print $fh $_[0]; return }
        $body .= $_[0];
        if (length $body > $limit) {
            open $fh, '+>', undef or die "temporary file for request body: $!\n";
            binmode $fh;
            print $fh $body;
            $body = '';
        }
    };
    # $left bytes of data: from the buffer first, then the socket in pieces
    my $copy = sub {
        my $left = shift;
        my $take = substr($$bufref, 0, $left, '');
        $store->($take);
        $left -= length $take;
        while ($left > 0) {
            my $piece = '';
            return 0 unless _fill($conn, \$piece, $left < READ_CHUNK ? $left : READ_CHUNK);
            $store->($piece);
            $left -= length $piece;
        }
        return 1;
    };

    if (!$chunked) {
        unless ($copy->($cl)) { $self->_error_response($conn, 400, $env); return }
    } else {
        my $total = 0;
        while (1) {
            # chunk-size [; ext] CRLF
            my $line_end;
            while (($line_end = index($$bufref, "\012")) < 0) {
                if (length $$bufref > 4096 || !_fill($conn, $bufref)) { $self->_error_response($conn, 400, $env); return }
            }
            my $line = substr($$bufref, 0, $line_end + 1, '');
            unless ($line =~ /^0*([0-9a-fA-F]+)[ \t]*(?:;[^\015\012]*)?\015?\012\z/) {
                $self->_error_response($conn, 400, $env); return;
            }
            my $hex = $1;
            # 12 hex digits are 256 TB: past that the size is an attack (and
            # past 16 it overflows); and no chunk may pass limit-post
            if (length $hex > 12) { $self->_error_response($conn, 413, $env); return }
            my $size = hex $hex;
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
            unless ($copy->($size)) { $self->_error_response($conn, 400, $env); return }
            while (length $$bufref < 2) {
                unless (_fill($conn, $bufref)) { $self->_error_response($conn, 400, $env); return }
            }
            unless (substr($$bufref, 0, 2, '') eq CRLF) { $self->_error_response($conn, 400, $env); return }
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
    $st->{keep} = 0 if $st->{keep} && $self->_stop_asked;
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
