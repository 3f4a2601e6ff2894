use strict;
use warnings;
use Test::More;
use Test::TCP qw(empty_port);
use IO::Socket::INET;
use POSIX ();
use FindBin;
use lib "$FindBin::Bin/lib";
use ForkServerTest::HTTP qw(wait_for http_raw children_of);

# `plackup -s ForkServer` finds the handler, serves, and stops on SIGTERM.
my $port = empty_port();
my $perl_dir = "$FindBin::Bin/../perl";
my $pid = fork // die;
if ($pid == 0) {
    open STDERR, '>', '/dev/null';
    { exec 'plackup', '-I', $perl_dir, '-s', 'ForkServer', '--host', '127.0.0.1', '--port', $port,
        '--workers', 2, '--max-requests', 100, "$FindBin::Bin/apps/http-hello.psgi"; }
    POSIX::_exit(127);
}
my $r;
ok wait_for(sub { IO::Socket::INET->new(PeerAddr => '127.0.0.1', PeerPort => $port) }, 20, 'listening'), 'plackup listens';
$r = http_raw($port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
is $r->{status}, 200;
is $r->{body}, 'Hello, World!';
my @workers;
ok wait_for(sub { @workers = children_of($pid); @workers == 2 }, 10), 'two workers';
like scalar(`cat /proc/$workers[0]/cmdline`), qr/worker \d/, 'worker process title';

kill 'TERM', $pid;
my $status;
ok wait_for(sub { if (waitpid($pid, POSIX::WNOHANG()) == $pid) { $status = $?; 1 } }, 15), 'plackup exited on SIGTERM';
is $status, 0, 'exit 0';
ok !kill(0, @workers), 'workers gone';

# A port in use: one line, exit status 1 (not errno 98 from a bare die).
my $busy = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 1) or die $!;
my $busy_port = $busy->sockport;
my $out = `plackup -I $perl_dir -s ForkServer --host 127.0.0.1 --port $busy_port $FindBin::Bin/apps/http-hello.psgi 2>&1`;
is $? >> 8, 1, 'port in use: exit 1';
like $out, qr/\A[^\n]*cannot listen on 127\.0\.0\.1:$busy_port: [^\n]+\n\z/, 'port in use: one line';
done_testing;
