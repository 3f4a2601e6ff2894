package ForkServerTest::HTTP;
use strict;
use warnings;

# Helpers for the t/http-*.t tests: start a real server process on a
# loopback socket with a socketpair standing in for the Emperor pipe, talk
# raw HTTP to it, wait for conditions with deadlines (never sleep as
# synchronisation), and always reap what was started.

use Exporter 'import';
use Errno qw(EINTR);
use File::Temp ();
use IO::Socket::INET ();
use POSIX ();
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use Time::HiRes ();
use ForkServer::HTTPServer;
use Plack::Util;

our @EXPORT = qw(start_server wait_for http_raw read_response connect_to
                 children_of slurp request_on kept_connection);

my @STARTED;

# A server may answer and close before a test has written its whole request
# (413, 431, a strict-head 400): that is a reply to read, not a reason for
# the test process to die of SIGPIPE.
$SIG{PIPE} = 'IGNORE';

sub wait_for {
    my ($cond, $timeout, $what) = @_;
    my $deadline = Time::HiRes::time() + ($timeout // 10);
    while (1) {
        my $r = $cond->();
        return $r if $r;
        if (Time::HiRes::time() > $deadline) {
            Test::More::diag("timed out waiting for " . ($what // 'condition'));
            return;
        }
        select(undef, undef, undef, 0.01);    # poll interval, not synchronisation
    }
}

sub slurp {
    my $f = shift;
    open my $fh, '<', $f or return '';
    local $/;
    return scalar <$fh> // '';
}

# Pids whose parent is $pid (from /proc).
sub children_of {
    my $ppid = shift;
    my @kids;
    opendir my $d, '/proc' or return;
    for my $p (grep { /^\d+$/ } readdir $d) {
        open my $fh, '<', "/proc/$p/stat" or next;
        my $s = <$fh> // next;
        # pid (comm) state ppid ...: comm may hold spaces and parentheses
        $s =~ /\)\s+\S+\s+(\d+)/ or next;
        push @kids, $p + 0 if $1 == $ppid;
    }
    my @sorted = sort { $a <=> $b } @kids;
    return wantarray ? @sorted : scalar @sorted;
}

# start_server(app => $app | app_file => $file, %server_options)
sub start_server {
    my %opt = @_;
    my $dir = File::Temp::tempdir(CLEANUP => 1);
    my $listen = IO::Socket::INET->new(
        LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 128, ReuseAddr => 1, Proto => 'tcp',
    ) or die "listen: $@";
    socketpair(my $emp, my $vassal_end, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
    $ENV{HTTP_TEST_DIR} = $dir;
    my $app = delete $opt{app};
    $app ||= Plack::Util::load_psgi(delete $opt{app_file});
    my $log = "$dir/access.log";
    my $err = "$dir/stderr.log";
    my $pid = fork // die "fork: $!";
    if ($pid == 0) {
        close $emp;
        open STDERR, '>>', $err or die;
        open my $lfh, '>>', $log or die;
        my $code = eval {
            ForkServer::HTTPServer->new(
                listen_sock => $listen, app => $app, name => 'testapp',
                emperor_fh => $vassal_end, access_log => $lfh, %opt,
            )->run;
            1;
        } ? 0 : do { print STDERR "run died: $@"; 1 };
        POSIX::_exit($code);
    }
    close $vassal_end;
    my $self = bless {
        pid => $pid, port => $listen->sockport, emperor => $emp, dir => $dir,
        log => $log, err => $err, listen => $listen, bytes => '',
    }, __PACKAGE__;
    push @STARTED, $self;
    return $self;
}

sub pid  { $_[0]{pid} }
sub port { $_[0]{port} }
sub dir  { $_[0]{dir} }
sub access_log { slurp($_[0]{log}) }
sub stderr { slurp($_[0]{err}) }
sub workers { children_of($_[0]{pid}) }

# Emperor-side: bytes received so far (accumulated), reading what is there.
sub emperor_bytes {
    my ($self, $wait) = @_;
    my $fh = $self->{emperor} or return $self->{bytes};
    while (1) {
        my $rin = '';
        vec($rin, fileno $fh, 1) = 1;
        my $n = select(my $rout = $rin, undef, undef, $wait // 0);
        last unless $n > 0;
        my $got = sysread($fh, my $b, 4096);
        last unless $got;
        $self->{bytes} .= $b;
        $wait = 0;
    }
    return $self->{bytes};
}

sub wait_emperor_byte {
    my ($self, $byte, $timeout, $count) = @_;
    $count //= 1;
    return wait_for(sub {
        my $b = $self->emperor_bytes(0.05);
        my $n = () = $b =~ /\Q${\ chr $byte}\E/g;
        $n >= $count;
    }, $timeout // 10, "emperor byte $byte x$count");
}

sub send_emperor { my ($self, $b) = @_; syswrite($self->{emperor}, chr $b) }
sub close_emperor { my $self = shift; close delete $self->{emperor} }

# Wait until every worker of the current set accepts (byte 17 seen once).
sub wait_ready { $_[0]->wait_emperor_byte(17, $_[1] // 10) }

# Is the master gone (reaped here)? Returns exit status or undef.
# Still running (not exited)?
sub running {
    my $self = shift;
    return 0 if defined $self->{status};
    my $r = waitpid($self->{pid}, POSIX::WNOHANG());
    if ($r == $self->{pid}) { $self->{status} = $?; return 0 }
    return 1;
}

sub wait_exit {
    my ($self, $timeout) = @_;
    return $self->{status} if defined $self->{status};
    my $ok = wait_for(sub {
        my $r = waitpid($self->{pid}, POSIX::WNOHANG());
        if ($r == $self->{pid}) { $self->{status} = $?; return 1 }
        return 0;
    }, $timeout // 15, "server exit");
    return $self->{status};
}

sub stop {
    my $self = shift;
    return if defined $self->{status};
    kill 'TERM', $self->{pid};
    unless (defined $self->wait_exit(15)) {
        kill 'KILL', $self->{pid}, $self->workers;
        waitpid($self->{pid}, 0);
        $self->{status} = $?;
    }
}

END {
    my $st = $?;
    $_->stop for grep { $_->{pid} && !defined $_->{status} } @STARTED;
    $? = $st;
}

sub connect_to {
    my $port = shift;
    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port, Proto => 'tcp', Timeout => 10)
        or die "connect: $@";
    $s->autoflush(1);
    return $s;
}

sub _read_more {
    my ($sock, $bufref, $timeout) = @_;
    my $rin = '';
    vec($rin, fileno $sock, 1) = 1;
    my $n = select(my $rout = $rin, undef, undef, $timeout // 20);
    return undef unless $n > 0;
    return sysread($sock, $$bufref, 65536, length $$bufref);
}

# Reads one response from $sock; $bufref holds bytes read past it.
# Returns { status, message, headers => {lc name => value}, body, raw_head } or undef on EOF.
sub read_response {
    my ($sock, $bufref, %o) = @_;
    my $buf = $bufref // \(my $b = '');
    while ($$buf !~ /\r\n\r\n/) {
        my $n = _read_more($sock, $buf, $o{timeout});
        return undef unless $n;
    }
    $$buf =~ s/\A(.*?\r\n)\r\n//s;
    my $head = $1;
    my ($status_line, @h) = split /\r\n/, $head;
    my ($proto, $status, $msg) = $status_line =~ m{^(HTTP/\d\.\d) (\d{3}) ?(.*)$} or die "bad status line: $status_line";
    my %h;
    for (@h) { my ($k, $v) = /^([^:]+):\s*(.*)$/; $h{lc $k} = defined $h{lc $k} ? "$h{lc $k}, $v" : $v }
    my $res = { proto => $proto, status => $status, message => $msg, headers => \%h, raw_head => $head, body => '' };
    return $res if $status < 200 || $status == 204 || $status == 304 || $o{head};
    if (defined $h{'content-length'}) {
        while (length $$buf < $h{'content-length'}) {
            my $n = _read_more($sock, $buf, $o{timeout});
            last unless $n;
        }
        $res->{body} = substr($$buf, 0, $h{'content-length'}, '');
    } elsif (($h{'transfer-encoding'} // '') =~ /chunked/i) {
        $res->{chunked} = 1;
        while (1) {
            while ($$buf !~ /\r\n/) { _read_more($sock, $buf, $o{timeout}) or return $res }
            $$buf =~ s/\A([0-9a-fA-F]+)[^\r\n]*\r\n// or die "bad chunk: " . substr($$buf, 0, 40);
            my $size = hex $1;
            push @{ $res->{chunks} }, $size;
            while (length $$buf < $size + 2) { _read_more($sock, $buf, $o{timeout}) or return $res }
            $res->{body} .= substr($$buf, 0, $size, '');
            substr($$buf, 0, 2, '');
            last if $size == 0;
        }
    } else {
        while (_read_more($sock, $buf, $o{timeout})) { }
        $res->{body} = $$buf;
        $$buf = '';
    }
    return $res;
}

# One request on a fresh connection; returns the response (or undef).
sub http_raw {
    my ($port, $raw, %o) = @_;
    my $s = connect_to($port);
    print $s $raw;
    my $buf = '';
    my $res = read_response($s, \$buf, %o);
    close $s;
    return $res;
}

# One request on an existing connection.
sub request_on {
    my ($s, $bufref, $raw, %o) = @_;
    print $s $raw;
    return read_response($s, $bufref, %o);
}

# A new keep-alive connection and the pid of the worker that answered its
# `GET /pid` (the test app's): ($pid, [$socket, \$buffer]), or () when
# it got no 200.
sub kept_connection {
    my ($port, %o) = @_;
    my $s = connect_to($port) or return;
    my $buf = '';
    my $r = request_on($s, \$buf, "GET /pid HTTP/1.1\r\nHost: x\r\n\r\n", %o);
    return unless $r && $r->{status} == 200;
    return ($r->{body}, [$s, \$buf]);
}

1;

__END__

=head1 NAME

ForkServerTest::HTTP - helpers for the HTTP server's tests

=head1 DESCRIPTION

Test-only. C<start_server(%options)> forks a real server on a loopback
socket with a socketpair as its Emperor pipe; the returned object knows its
pid, port, workers, access log, stderr and the Emperor bytes received.
C<wait_for($cond, $timeout)> polls a condition up to a deadline. Servers
still running are stopped and reaped at END.

=cut
