# A tenant's probe: what a vassal's process can see of root, of the base
# and of its own identity. Preloaded by a base, it opens TENANT_PRELOAD_FILE
# (a root-only file; none when empty) and keeps the handle, as an app's
# logger or database handle would, connects to TENANT_PRELOAD_SOCKET (a
# UNIX socket) and keeps it, with TENANT_PRELOAD_PIPE keeps a pipe to a
# helper it started (and with TENANT_NOT_DUMPABLE makes
# itself not dumpable); its warm-up (GET /warm) draws a token, opens
# TENANT_WARM_FILE and starts TENANT_HELPERS helper processes.
use strict;
use warnings;
use JSON::PP ();
use POSIX ();

our ($PRELOADED, $PRELOADED_SOCKET, $PRELOADED_PIPE, $WARMED, $WARMED_IN, $TOKEN, $TOKEN_IN, $HELPERS_IN, @HELPERS);
if (length(my $f = $ENV{TENANT_PRELOAD_FILE} // '')) {
    open $PRELOADED, '<', $f or die "preload $f: $!\n";
}
if (length(my $s = $ENV{TENANT_PRELOAD_SOCKET} // '')) {
    # a connection to a root-only service (a daemon's control socket), kept
    require IO::Socket::UNIX;
    $PRELOADED_SOCKET = IO::Socket::UNIX->new(Peer => $s) or die "preload socket $s: $!\n";
}
if ($ENV{TENANT_PRELOAD_PIPE}) {
    # a pipe to a helper it started (as whoever loads it: root in a plain vassal)
    my $pid = open($PRELOADED_PIPE, '|-') // die "preload pipe: $!\n";
    if (!$pid) { $0 = "tenant helper of $ENV{TENANT_HELPER_TAG}"; sleep 1 while 1 }
}
if ($ENV{TENANT_NOT_DUMPABLE}) {
    # an app that keeps its memory from other processes of its uid
    require ForkServer::Process::Syscalls;
    syscall(ForkServer::Process::Syscalls::number('prctl'), 4, 0, 0, 0, 0) == 0 or die "PR_SET_DUMPABLE: $!\n";
}

sub _warm {
    # a per-process token (a session secret, a temporary name's prefix)
    ($TOKEN, $TOKEN_IN) = (int(rand(1e15)), $$) unless ($TOKEN_IN // 0) == $$;
    if (defined(my $f = $ENV{TENANT_WARM_FILE})) {
        # once per process that warms up (the base, a spare's worker)
        if (($WARMED_IN // 0) != $$) {
            open $WARMED, '<', $f or die "warm $f: $!\n";
            $WARMED_IN = $$;
        }
    }
    return if ($HELPERS_IN // 0) == $$;    # once per process that warms up
    $HELPERS_IN = $$;
    for (1 .. ($ENV{TENANT_HELPERS} // 0)) {
        my $pid = fork // die "fork: $!\n";
        if (!$pid) {
            $0 = "tenant helper of $ENV{TENANT_HELPER_TAG}";
            POSIX::close($_) for 3 .. 64;    # holds no pipe of anybody's
            sleep 1 while 1;
        }
        push @HELPERS, $pid;
    }
}

sub _read_fd {
    my ($n) = @_;
    my %r;
    if (open my $fh, '<', "/proc/self/fd/$n") { local $/; $r{proc} = <$fh> // '' }
    else { $r{proc_error} = "$!" }
    $r{target} = readlink("/proc/self/fd/$n");
    # never read a pipe or a socket (the number may be ours again): it could block
    if (!defined $r{target} || $r{target} !~ m{\A/}) { $r{fd_error} = 'not a file' }
    elsif (open my $fh, '<&', $n) { sysseek $fh, 0, 0; sysread $fh, my $buf, 4096; $r{fd} = $buf // "error: $!" }
    else { $r{fd_error} = "$!" }
    return \%r;
}

sub _fds {
    opendir my $dh, '/proc/self/fd' or return {};
    my %fds = map { $_ => readlink("/proc/self/fd/$_") // '?' } grep { /\A\d+\z/ } readdir $dh;
    return \%fds;
}

my $app = sub {
    my ($env) = @_;
    my $path = $env->{PATH_INFO};
    my %q = map { split /=/, $_, 2 } split /&/, $env->{QUERY_STRING} // '';
    my %out = (pid => $$, ppid => getppid());
    if ($path eq '/warm') {
        _warm();
    }
    elsif ($path eq '/ids') {
        open my $fh, '<', '/proc/self/status';
        %out = (%out, map { /\A(Uid|Gid|Groups):\s*(.*?)\s*\z/ ? ($1 => $2) : () } <$fh>);
    }
    elsif ($path eq '/read') {
        if (open my $fh, '<', $q{path}) { local $/; $out{content} = <$fh> }
        else { $out{error} = "$!" }
    }
    elsif ($path eq '/fd') {
        %out = (%out, %{ _read_fd($q{n}) });
    }
    elsif ($path eq '/fds') {
        $out{fds} = _fds();
        $out{preloaded} = $PRELOADED ? fileno($PRELOADED) : undef;
        $out{warmed} = $WARMED ? fileno($WARMED) : undef;
        $out{preloaded_socket} = $PRELOADED_SOCKET ? fileno($PRELOADED_SOCKET) : undef;
        $out{preloaded_pipe} = $PRELOADED_PIPE ? fileno($PRELOADED_PIPE) : undef;
    }
    elsif ($path eq '/token') {
        ($TOKEN, $TOKEN_IN) = (int(rand(1e15)), $$) unless ($TOKEN_IN // 0) == $$;
        $out{token} = $TOKEN;
        $out{rand} = int(rand(1e15));
    }
    elsif ($path eq '/block') {
        # /block?name=N&dir=D: says it started (D/N.started), then waits
        # asleep for D/N.go (60 s at most), as a slow route waits on a backend
        open my $fh, '>', "$q{dir}/$q{name}.started" or die "$q{dir}/$q{name}.started: $!\n";
        close $fh;
        my $until = time + 60;
        select(undef, undef, undef, 0.01) until -e "$q{dir}/$q{name}.go" || time > $until;
        $out{done} = $q{name};
    }
    elsif ($path eq '/getfd') {
        # /getfd?pid=P&fd=N: can this process take descriptor N of process P
        # (pidfd_getfd(2))? 434 and 438 (pidfd_open, pidfd_getfd) are the
        # same on every architecture.
        my $pidfd = syscall(434, $q{pid} + 0, 0);
        if ($pidfd < 0) { @out{qw(step errno error)} = ('pidfd_open', $! + 0, "$!") }
        else {
            my $fd = syscall(438, $pidfd, $q{fd} + 0, 0);
            if ($fd < 0) { @out{qw(step errno error)} = ('pidfd_getfd', $! + 0, "$!") }
            else { $out{got} = readlink("/proc/self/fd/$fd"); POSIX::close($fd) }
            POSIX::close($pidfd);
        }
    }
    elsif ($path eq '/give') {
        # /give?sock=S: hands its standard output (its output pipe to the
        # Emperor) to whoever listens on S (SCM_RIGHTS), a process outside
        # the vassal, then asks the Emperor for its replacement (byte 22)
        require IO::Socket::UNIX;
        require Socket::MsgHdr;
        my $s = IO::Socket::UNIX->new(Peer => $q{sock}) or die "connect $q{sock}: $!\n";
        my $m = Socket::MsgHdr->new(buf => 'x');
        $m->cmsghdr(Socket::SOL_SOCKET(), Socket::SCM_RIGHTS(), pack('i', 1));
        Socket::MsgHdr::sendmsg($s, $m, 0) or die "sendmsg: $!\n";
        close $s;
        POSIX::write($ENV{UWSGI_EMPEROR_FD}, chr(22), 1) if $q{replace};
        $out{gave} = 1;
    }
    elsif ($path eq '/env') {
        $out{$_} = $ENV{$_} for qw(UWSGI_EMPEROR_FD UWSGI_EMPEROR_FD_CONFIG APP_NAME);
    }
    return [200, ['Content-Type' => 'application/json'], [JSON::PP->new->canonical->encode(\%out)]];
};
$app;
