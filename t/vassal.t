use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use IO::Socket::INET;
use IO::Socket::UNIX;
use POSIX ();
use Socket qw(SOCK_STREAM);
use Test::TCP qw(empty_port);
use ForkServerTest::Emperor qw(
    become_subreaper spawn_vassal adopt read_bytes read_reply http_get wait_for wait_gone stop_pid
);

plan skip_all => 'Linux only' unless $^O eq 'linux';
become_subreaper();

my $dir   = tempdir(CLEANUP => 1);
chmod 0711, $dir;    # another uid must reach the socket to be refused by its uid check
my $hello = Cwd::abs_path('t/apps/hello.psgi');
sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> }

# An app file anyone may read (a vassal that drops root loads it as its user).
sub write_app {
    my ($path, $text) = @_;
    open my $out, '>', $path or die "$path: $!";
    print $out $text;
    close $out or die "$path: $!";
    chmod 0644, $path;
    return $path;
}

subtest 'plain vassal: cold load, pipe bytes, env, stop on byte 2' => sub {
    my $port = empty_port();
    my $v = spawn_vassal(argv => ['--name', 'plain1', '--http-socket', "127.0.0.1:$port", '--psgi', $hello,
        '--env', 'APP_NAME=plain1', '--processes', 2], stderr => "$dir/plain1.log");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/plain1.log");
    my $res = http_get($port, 10) // '';
    like $res, qr/APP_NAME=plain1/, 'env reaches %ENV';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
};

subtest 'plain vassal on an inherited listening socket (descriptor 0)' => sub {
    my $listen = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 8, ReuseAddr => 1) or die $!;
    my $port = $listen->sockport;
    my $pid = fork // die;
    if (!$pid) {    # the Emperor's on-demand socket arrives as stdin
        POSIX::dup2(fileno $listen, 0);
        { exec $^X, 'perl/ForkServer.pm', '--name', 'od', '--psgi', $hello, '--env', 'APP_NAME=od', '--disable-logging' }
        POSIX::_exit(97);
    }
    close $listen;
    like http_get($port, 10) // '', qr/APP_NAME=od/, 'serves on descriptor 0 without http-socket';
    ok stop_pid($pid), 'stopped';
};

subtest 'plain vassal: port in use is one line, exit 1' => sub {
    my $busy = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1) or die $!;
    my $port = $busy->sockport;
    my $out = `$^X perl/ForkServer.pm --name busy --http-socket 127.0.0.1:$port --psgi $hello 2>&1`;
    is $? >> 8, 1, 'exit 1';
    like $out, qr/\Apsgi-vassal busy: error: cannot listen on http-socket 127\.0\.0\.1:$port: [^\n]+\n\z/, 'one line';
};

# The socket a vassal binds for http-socket HOST:PORT, [IPV6]:PORT or
# :PORT: the one IO::Socket::IP made with the same arguments, made with
# plain system calls (ForkServer::Vassal::listen_inet).
subtest 'listen_inet: the socket and the errors IO::Socket::IP gave' => sub {
    require ForkServer::Vassal;
    require IO::Socket::IP;
    my $int = sub { unpack 'i', getsockopt($_[0], $_[1], $_[2]) };
    my ($v4, $err) = ForkServer::Vassal::listen_inet('127.0.0.1', 0, 8);
    ok $v4, 'IPv4' or diag $err;
    is Socket::sockaddr_family(getsockname $v4), Socket::AF_INET(), 'an IPv4 socket';
    is $int->($v4, Socket::SOL_SOCKET(), Socket::SO_REUSEADDR()), 1, 'SO_REUSEADDR';
    is $int->($v4, Socket::SOL_SOCKET(), Socket::SO_ACCEPTCONN()), 1, 'listening';
    my $port = (Socket::unpack_sockaddr_in(getsockname $v4))[0];
    my ($busy, $busy_err) = ForkServer::Vassal::listen_inet('127.0.0.1', $port, 8);
    my $io = IO::Socket::IP->new(LocalHost => '127.0.0.1', LocalPort => $port, Listen => 8, ReuseAddr => 1, Type => SOCK_STREAM);
    ok !$busy && !$io, 'a port in use is refused';
    is $busy_err, "$@", 'with the error IO::Socket::IP gave';
    my ($none, $gai_err) = ForkServer::Vassal::listen_inet('no-such-host.invalid', $port, 8);
    $io = IO::Socket::IP->new(LocalHost => 'no-such-host.invalid', LocalPort => $port, Listen => 8, Type => SOCK_STREAM);
    ok !$none && !$io, 'a name that does not resolve is refused';
    is $gai_err, "$@", 'with the error IO::Socket::IP gave';
    my ($dual, $dual_err) = ForkServer::Vassal::listen_inet('::', 0, 8, 0);
    SKIP: {
        skip "no IPv6 here: $dual_err", 4 unless $dual;
        is Socket::sockaddr_family(getsockname $dual), Socket::AF_INET6(), 'all addresses: an IPv6 socket';
        is $int->($dual, Socket::IPPROTO_IPV6(), Socket::IPV6_V6ONLY()), 0, 'dual-stack (IPV6_V6ONLY 0)';
        my $dport = (Socket::unpack_sockaddr_in6(getsockname $dual))[0];
        ok(IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $dport), 'reached over IPv4');
        ok(IO::Socket::IP->new(PeerHost => '::1', PeerPort => $dport), 'reached over IPv6');
    }
};

subtest 'plain vassal on [::1]:PORT and :PORT' => sub {
    my ($probe) = ForkServer::Vassal::listen_inet('::1', 0, 1);
    plan skip_all => 'no IPv6 loopback here' unless $probe;
    close $probe;
    require IO::Socket::IP;
    my $get = sub {
        my ($host, $port) = @_;
        my $c = IO::Socket::IP->new(PeerHost => $host, PeerPort => $port, Timeout => 10) or return '';
        print $c "GET / HTTP/1.0\r\nHost: x\r\n\r\n";
        local $/;
        return <$c> // '';
    };
    for my $case (['v6', '[::1]', ['::1']], ['any', '', ['127.0.0.1', '::1']]) {
        my ($name, $host, $peers) = @$case;
        my $port = empty_port();
        my $v = spawn_vassal(argv => ['--name', $name, '--http-socket', "$host:$port", '--psgi', $hello,
            '--env', "APP_NAME=$name", '--disable-logging'], stderr => "$dir/$name.log");
        is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", "$host:$port: bytes 1, 5, 17" or diag slurp("$dir/$name.log");
        like $get->($_, $port), qr/APP_NAME=$name/, "$host:$port answers on $_" for @$peers;
        syswrite $v->{pipe}, "\x02";
        ok wait_gone($v->{pid}, 15), 'stops on byte 2';
    }
};

subtest 'chdir and procname' => sub {
    my $port = empty_port();
    my $where = Cwd::abs_path('t/apps/whereami.psgi');
    my $v = spawn_vassal(argv => ['--name', 'moved', '--http-socket', "127.0.0.1:$port", '--psgi', $where,
        '--chdir', $dir, '--procname', 'shop-7 (psgi)', '--disable-logging'], stderr => "$dir/moved.log");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/moved.log");
    like http_get($port, 10) // '', qr/^cwd=\Q$dir\E$/m, 'the app runs in the chdir directory';
    is slurp("/proc/$v->{pid}/cmdline") =~ s/\0+\z//r, 'shop-7 (psgi)', 'procname is the process title';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
};

subtest 'plain vassal started as root drops to uid/gid after binding' => sub {
    plan skip_all => 'needs root' unless $> == 0;
    my $port = empty_port();    # a port only root could not bind is not needed: binding comes first
    # the app loads after the drop: a copy uid 65534 can read, wherever the checkout is
    my $app = "$dir/hello-for-nobody.psgi";
    write_app($app, slurp($hello));
    my $v = spawn_vassal(argv => ['--name', 'dropped', '--http-socket', "127.0.0.1:$port", '--psgi', $app,
        '--uid', 65534, '--gid', 65534, '--disable-logging'], stderr => "$dir/dropped.log");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/dropped.log");
    my ($worker) = (http_get($port, 10) // '') =~ /pid=(\d+)/;
    ok $worker, 'a worker answers' or diag slurp("$dir/dropped.log");
    for my $pid ($v->{pid}, $worker) {
        my $status = slurp("/proc/$pid/status");
        like $status, qr/^Uid:\s+65534\s+65534\s+65534\s+65534$/m, "pid $pid runs as uid 65534 (real, effective, saved, fs)";
        like $status, qr/^Gid:\s+65534\s+65534\s+65534\s+65534$/m, "pid $pid runs as gid 65534";
        like $status, qr/^Groups:\s*65534\s*$/m, "pid $pid kept no supplementary group of root";
    }
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
};

subtest 'a uid vassal whose app file its user cannot reach: one line that says so' => sub {
    plan skip_all => 'needs root' unless $> == 0;
    my $private = "$dir/root-only";
    mkdir $private, 0700 or die "$private: $!";
    my $app = "$private/app.psgi";
    write_app($app, slurp($hello));
    my $port = empty_port();
    my $out_text = `$^X perl/ForkServer.pm --name hidden --http-socket 127.0.0.1:$port --psgi $app --uid 65534 --gid 65534 2>&1`;
    is $? >> 8, 1, 'exit 1';
    like $out_text, qr/\Apsgi-vassal hidden: error: app file '\Q$app\E' cannot be reached by uid 65534 \(Permission denied\)\n\z/,
        'not "not found"';
};

subtest 'a uid vassal leaves out of @INC what its user cannot enter' => sub {
    plan skip_all => 'needs root' unless $> == 0;
    my $hidden = "$dir/root-only-lib";
    mkdir $hidden, 0700 or die "$hidden: $!";
    my $app = "$dir/uses-json.psgi";
    write_app($app, "use JSON::PP (); sub { [200, ['Content-Type' => 'text/plain'], [JSON::PP::encode_json([\$\$])]] };\n");
    my $port = empty_port();
    local $ENV{PERL5LIB} = $hidden;    # first in @INC, as a checkout under /root would be
    my $v = spawn_vassal(argv => ['--name', 'inc', '--http-socket', "127.0.0.1:$port", '--psgi', $app,
        '--uid', 65534, '--gid', 65534, '--disable-logging'], stderr => "$dir/inc.log");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/inc.log");
    like http_get($port, 10) // '', qr/^\[\d+\]$/m, "the app's `use JSON::PP` found it further down \@INC";
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
};

subtest 'base: peer uid check, end of file, live socket kept' => sub {
    my $sock = "$dir/fs.sock";
    my $log  = "$dir/base.log";
    my $base = spawn_vassal(argv => ['--name', 'b', '--early-psgi', $hello, '--fork-server', $sock,
        '--fork-server-mode', '0666'], stderr => $log);
    is read_bytes($base->{pipe}, 1, 20), "\x01", 'byte 1' or diag slurp($log);
    is((stat $sock)[2] & 07777, 0666, 'fork-server-mode applies');

    SKIP: {
        skip 'needs root to connect as another uid', 2 unless $> == 0;
        my $pid = fork // die;
        if (!$pid) {
            POSIX::setuid(65534) or POSIX::_exit(2);
            my $c = IO::Socket::UNIX->new(Peer => $sock, Type => SOCK_STREAM) or POSIX::_exit(3);
            syswrite $c, "\x23\x00\x00\x01";
            POSIX::_exit(defined read_reply($c, 10) ? 4 : 0);    # closed, no reply
        }
        waitpid $pid, 0;
        is $? >> 8, 0, "another uid is refused: closed without reply (child status " . ($? >> 8) . ")";
        ok wait_for(10, sub { slurp($log) =~ /refused connection from pid \d+ uid 65534: uid not allowed/ }),
            'and logged with pid and uid';
    }

    my $second = `$^X perl/ForkServer.pm --name b2 --fork-server $sock 2>&1`;
    like $second, qr/psgi-vassal b2: error: another fork server is listening/, 'a live socket is not stolen';
    ok -S $sock, 'and is still there';

    my $v = adopt($sock, argv => ['--name', 'bad', '--frobnicate', 1]);
    ok $v->{pid}, 'an adopted vassal with a bad option replies with its pid';
    ok wait_gone($v->{pid}, 10), 'then exits';
    ok wait_for(10, sub { slurp($log) =~ /psgi-vassal bad: error: unknown option '--frobnicate'/ }),
        'with one line naming it';

    close $base->{pipe};
    ok wait_gone($base->{pid}, 15), 'base stops on end of file';
    ok !-e $sock, 'socket removed';
};

# The vassal ends up the requester's child either way: born so (clone with
# CLONE_PARENT) when the requester is the base's parent, reparented to us,
# the subreaper, after a double fork otherwise (another requester, or
# fork-server-double-fork).
sub _ppid_of { open my $fh, '<', "/proc/$_[0]/stat" or return 0; (<$fh> =~ /\)\s+\S+\s+(\d+)/)[0] // 0 }
for my $case (['clone', []], ['double fork', ['--fork-server-double-fork']]) {
    my ($how, $extra) = @$case;
    subtest "base: adoption by $how" => sub {
        my $sock = "$dir/fs-$how.sock" =~ s/ /-/gr;
        my $log  = "$dir/base-$how.log" =~ s/ /-/gr;
        my $base = spawn_vassal(argv => ['--name', 'b', '--early-psgi', $hello, '--fork-server', $sock, @$extra],
            stderr => $log);
        is read_bytes($base->{pipe}, 1, 20), "\x01", 'byte 1' or diag slurp($log);
        like slurp($log), ($how eq 'clone' ? qr/\(clone\(CLONE_PARENT\) for requests from pid $$/
                                           : qr/\(double fork: fork-server-double-fork is set; huge pages: [^)]+\)/), 'logs how it forks';
        my $port = empty_port();
        my $v = adopt($sock, argv => ['--name', 'a', '--http-socket', "127.0.0.1:$port", '--env', 'APP_NAME=a']);
        ok $v->{pid}, "pid reply ($v->{pid})";
        is read_bytes($v->{pipe}, 1, 20), "\x01", 'the vassal starts';
        ok wait_for(10, sub { _ppid_of($v->{pid}) == $$ }), 'its parent is the requester (the Emperor)';
        like http_get($port, 10) // '', qr/APP_NAME=a/, 'it serves';
        # A request from another process than the base's parent: double fork.
        pipe(my $r, my $w) or die;
        my $helper = fork // die;
        if (!$helper) {
            close $r;
            my $port2 = empty_port();
            my $v2 = adopt($sock, argv => ['--name', 'a2', '--http-socket', "127.0.0.1:$port2", '--env', 'APP_NAME=a2']);
            syswrite $w, ($v2->{pid} // 0) . " $port2\n";
            close $v2->{pipe};    # its end of file stops it
            POSIX::_exit(0);
        }
        close $w;
        my ($pid2) = split ' ', (<$r> // '0');
        waitpid $helper, 0;
        ok $pid2, "a helper process's request is served too (pid $pid2)";
        ok wait_gone($pid2, 15), 'and that vassal, reparented to us, stops on end of file' if $pid2;
        ok !kill(0, $pid2) || _ppid_of($pid2) == $$, 'and was ours to reap' if $pid2;
        close $v->{pipe};
        ok wait_gone($v->{pid}, 15), 'the vassal stops on end of file';
        close $base->{pipe};
        ok wait_gone($base->{pid}, 15), 'base stops';
        is scalar(() = slurp($log) =~ /error/g), 0, 'no error logged' or diag slurp($log);
    };
}

# What kill -9 of the Emperor does to its vassals: every Emperor pipe
# reaches end of file at once. The base, each vassal and each worker go.
sub _children_of {
    my ($ppid) = @_;
    opendir my $d, '/proc' or return;
    return grep { /^\d+$/ && _ppid_of($_) == $ppid } readdir $d;
}
subtest 'the Emperor gone: base, vassals and workers stop' => sub {
    my $sock = "$dir/fs-gone.sock";
    my $log  = "$dir/base-gone.log";
    my $base = spawn_vassal(argv => ['--name', 'b', '--early-psgi', $hello, '--fork-server', $sock], stderr => $log);
    is read_bytes($base->{pipe}, 1, 20), "\x01", 'byte 1' or diag slurp($log);
    my @v = map { adopt($sock, argv => ['--name', "g$_", '--http-socket', '127.0.0.1:' . empty_port(), '--processes', 2]) } 1 .. 2;
    is read_bytes($_->{pipe}, 3, 20), "\x01\x05\x11", "vassal $_->{pid} loyal" for @v;
    my @workers = map { _children_of($_->{pid}) } @v;
    is scalar @workers, 4, 'two workers each';
    close $_->{pipe} for $base, @v;
    ok wait_gone($_, 15), "pid $_ gone" for $base->{pid}, (map { $_->{pid} } @v), @workers;
};

subtest 'base: a missing early-psgi is one line, exit 1, no socket' => sub {
    my $out = `$^X perl/ForkServer.pm --name b3 --early-psgi $dir/none.psgi --fork-server $dir/b3.sock 2>&1`;
    is $? >> 8, 1, 'exit 1';
    like $out, qr/\Apsgi-vassal b3: error: app file .* not found\n\z/, 'one line';
    ok !-e "$dir/b3.sock", 'app loaded before the socket is bound';
};

subtest 'one log format: the vassal and its HTTP server say "psgi-vassal NAME: ", one line each' => sub {
    my $app = "$dir/logfmt.psgi";
    open my $fh, '>', $app or die $!;
    print $fh 'my $n = 0; sub { POSIX::_exit(3) if ++$n == 2; die "first line\nsecond line\n" }';
    close $fh;
    my $port = empty_port();
    my $log  = "$dir/logfmt.log";
    my $v = spawn_vassal(argv => ['--name', 'logfmt', '--http-socket', "127.0.0.1:$port", '--psgi', $app,
        '--processes', 1, '--disable-logging'], stderr => $log);
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'loyal' or diag slurp($log);
    like http_get($port, 10) // '', qr/\AHTTP\/1\.[01] 500/, 'the app dies: 500';
    http_get($port, 10);    # the worker exits in the request
    ok wait_for(20, sub { slurp($log) =~ /died \(exit 3\), respawning/ }), 'the worker death is logged'
        or diag slurp($log);
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
    my @lines = split /\n/, slurp($log);
    ok @lines >= 2, 'lines logged';
    like $_, qr/\Apsgi-vassal logfmt: /, "one format: $_" for @lines;
    ok((grep { /app error: first line \| second line\z/ } @lines), 'a multi-line error is one line') or diag slurp($log);
};

done_testing;
