package ForkServerTest::Emperor;
use strict;
use warnings;

# A small Emperor stand-in for tests: starts vassal programs with an Emperor
# pipe, adopts vassals through a fork server, reads pipe bytes, talks HTTP,
# and waits for conditions with deadlines (never sleeps as synchronisation).

use Exporter 'import';
use Cwd ();
use Fcntl qw(F_GETFD F_SETFD);
use IO::Select;
use IO::Socket::INET;
use IO::Socket::UNIX;
use POSIX qw(WNOHANG);
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC SOL_SOCKET SCM_RIGHTS);
use Socket::MsgHdr ();
use Time::HiRes qw(time);
use ForkServer::Protocol qw(encode_packet encode_array decode_packet decode_dict);

our @EXPORT_OK = qw(
    become_subreaper spawn_vassal adopt send_request read_bytes read_reply http_get
    wait_for wait_gone stop_pid fd_targets socket_inode_of_path program
);

my %started;    # pid => 1, everything a test started, killed at END

sub program { Cwd::abs_path('perl/ForkServer.pm') }

# Adopted vassals lose their parent; as a subreaper we get them back and can
# reap them, as the real Emperor does. x86_64 Linux: prctl = 157,
# PR_SET_CHILD_SUBREAPER = 36.
sub become_subreaper {
    return 0 unless $^O eq 'linux' && `uname -m` =~ /x86_64/;
    return syscall(157, 36, 1, 0, 0, 0) == 0;
}

sub _socketpair {
    socketpair(my $ours, my $theirs, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    return ($ours, $theirs);
}

# fork+exec the vassal program with an Emperor pipe, only stdio and the pipe
# inherited (the test harness may hold other descriptors).
sub spawn_vassal {
    my (%args) = @_;
    my ($ours, $theirs) = _socketpair();
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        my $keep = fileno $theirs;
        opendir my $d, '/proc/self/fd' or POSIX::_exit(99);
        my @fds = grep { /^\d+$/ && $_ > 2 && $_ != $keep } readdir $d;
        closedir $d;
        POSIX::close($_) for @fds;
        fcntl($theirs, F_SETFD, 0);
        $ENV{UWSGI_EMPEROR_FD} = $keep;
        if ($args{stderr}) { open STDERR, '>>', $args{stderr} or POSIX::_exit(98) }
        if ($args{stdout}) { open STDOUT, '>>', $args{stdout} or POSIX::_exit(98) }
        { exec $^X, program(), @{ $args{argv} } }
        POSIX::_exit(97);
    }
    close $theirs;
    $started{$pid} = 1;
    return { pid => $pid, pipe => $ours };
}

# Sends one request with sendmsg: the packet and the descriptors together.
sub send_request {
    my ($path, $bytes, @fds) = @_;
    my $sock = IO::Socket::UNIX->new(Peer => $path, Type => SOCK_STREAM) or die "connect $path: $!";
    my $msg = Socket::MsgHdr->new(buf => $bytes);
    $msg->cmsghdr(SOL_SOCKET, SCM_RIGHTS, pack('i*', @fds)) if @fds;
    defined Socket::MsgHdr::sendmsg($sock, $msg) or die "sendmsg: $!";
    return $sock;
}

# Adopts a vassal. Returns { pid, pipe, config_pipe, reply, elapsed }.
sub adopt {
    my ($path, %args) = @_;
    my ($pipe, $vassal_pipe) = _socketpair();
    my ($config, $vassal_config);
    my @fds = (fileno $vassal_pipe);
    my $mask = 0x01;
    if (defined $args{config_text}) {
        ($config, $vassal_config) = _socketpair();
        syswrite $config, encode_packet(115, 0, $args{config_text});
        push @fds, fileno $vassal_config;
        $mask |= 0x02;
    }
    if ($args{ondemand}) { push @fds, fileno $args{ondemand}; $mask |= 0x04 }
    my $t0 = time;
    my $sock = send_request($path, encode_packet(35, $mask, encode_array(program(), @{ $args{argv} })), @fds);
    close $vassal_pipe;
    close $vassal_config if $vassal_config;
    my $reply = read_reply($sock, $args{timeout} // 10);
    my %dict = $reply ? decode_dict((decode_packet($reply))[2]) : ();
    $started{ $dict{pid} } = 1 if $dict{pid};
    return { pid => $dict{pid}, pipe => $pipe, config_pipe => $config, reply => $reply, elapsed => time - $t0 };
}

# Reads until end of file or the deadline. Returns the bytes (undef if none).
sub read_reply {
    my ($sock, $timeout) = @_;
    my $buf = read_bytes($sock, 1 << 20, $timeout);
    return length $buf ? $buf : undef;
}

# Reads up to $n bytes, until end of file or the deadline.
sub read_bytes {
    my ($fh, $n, $timeout) = @_;
    my $deadline = time + $timeout;
    my $buf = '';
    my $sel = IO::Select->new($fh);
    while (length $buf < $n) {
        my $left = $deadline - time;
        last if $left <= 0;
        next unless $sel->can_read($left);
        my $got = sysread $fh, $buf, $n - length $buf, length $buf;
        last unless $got;
    }
    return $buf;
}

sub http_get {
    my ($port, $timeout, $host) = @_;
    my $sock = IO::Socket::INET->new(PeerAddr => $host // '127.0.0.1', PeerPort => $port, Timeout => $timeout)
        or return undef;
    syswrite $sock, "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    my $res = read_bytes($sock, 1 << 20, $timeout);
    return $res;
}

sub wait_for {
    my ($timeout, $cond) = @_;
    my $deadline = time + $timeout;
    while (time < $deadline) {
        my $v = $cond->();
        return $v if $v;
        select undef, undef, undef, 0.01;    # polling interval, not a synchronisation
    }
    return $cond->();
}

sub _gone {
    my ($pid) = @_;
    my $r = waitpid($pid, WNOHANG);
    return 1 if $r == $pid || !kill(0, $pid);
    # a zombie whose parent (not us) does not reap it is gone for our purpose
    open my $fh, '<', "/proc/$pid/stat" or return 1;
    my $stat = <$fh>;
    return $stat =~ /\)\s+Z\s/ ? 1 : 0;
}

sub wait_gone {
    my ($pid, $timeout) = @_;
    my $ok = wait_for($timeout, sub { _gone($pid) });
    delete $started{$pid} if $ok;
    return $ok;
}

sub stop_pid {
    my ($pid) = @_;
    return 1 if _gone($pid);
    kill 'TERM', $pid;
    return 1 if wait_gone($pid, 5);
    kill 'KILL', $pid;
    return wait_gone($pid, 5);
}

# fd number => link target ("socket:[123]", "/dev/null", ...)
sub fd_targets {
    my ($pid) = @_;
    opendir my $d, "/proc/$pid/fd" or return {};
    my %t;
    for my $fd (grep { /^\d+$/ } readdir $d) {
        my $target = readlink "/proc/$pid/fd/$fd";
        $t{$fd} = $target if defined $target;
    }
    return \%t;
}

sub socket_inode_of_path {
    my ($path) = @_;
    open my $fh, '<', '/proc/net/unix' or return;
    while (<$fh>) {
        my @f = split;
        return $f[6] if @f >= 8 && $f[7] eq $path;
    }
    return;
}

END {
    local $?;
    stop_pid($_) for keys %started;
}

1;
