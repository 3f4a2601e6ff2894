use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use Test::TCP qw(empty_port);
use ForkServerTest::Emperor qw(become_subreaper spawn_vassal read_bytes wait_gone);
use ForkServerTest::HTTP qw(http_raw connect_to);

# The HTTP limits are vassal keys that reach the server.
plan skip_all => 'Linux only' unless $^O eq 'linux';
become_subreaper();
my $dir = tempdir(CLEANUP => 1);
my $hello = Cwd::abs_path('t/apps/hello.psgi');
sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> }

my $port = empty_port();
my $v = spawn_vassal(argv => ['--name', 'limits', '--http-socket', "127.0.0.1:$port", '--psgi', $hello,
    '--limit-post', 100, '--buffer-size', 1024, '--http-header-timeout', 1, '--disable-logging'],
    stderr => "$dir/limits.log");
is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/limits.log");
is http_raw($port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")->{status}, 200, 'served';
is http_raw($port, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n")->{status}, 413, 'limit-post';
is http_raw($port, "GET / HTTP/1.1\r\nHost: x\r\nX: " . ('a' x 1100) . "\r\n\r\n")->{status}, 431, 'buffer-size';
my $s = connect_to($port);
print $s "GET / HTTP/1.1\r\n";
my $buf = '';
my $rin = '';
vec($rin, fileno $s, 1) = 1;
select(my $rout = $rin, undef, undef, 20);
sysread($s, $buf, 4096);
like $buf, qr{^HTTP/1.1 408 }, 'http-header-timeout: a partial head gets 408';
syswrite $v->{pipe}, "\x02";
ok wait_gone($v->{pid}, 15), 'stops on byte 2';
done_testing;
