use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use Test::TCP qw(empty_port);
use ForkServerTest::Emperor qw(become_subreaper spawn_vassal adopt read_bytes wait_for wait_gone);
use ForkServerTest::HTTP qw(http_raw);

# Whatever layers an app puts on STDOUT and STDERR (an :encoding(UTF-8) at
# load time, a :utf8 inside a request), our own lines keep being written
# and the app's own output keeps its encoding.
plan skip_all => 'Linux only' unless $^O eq 'linux';
become_subreaper();
my $dir = tempdir(CLEANUP => 1);
my $app = Cwd::abs_path('t/apps/layers.psgi');
my $err = "$dir/base.stderr";
sub slurp { open my $fh, '<:raw', $_[0] or return ''; local $/; <$fh> }
sub get { my ($port, $path) = @_; http_raw($port, "GET $path HTTP/1.1\r\nHost: x\r\nUser-Agent: layers\r\nConnection: close\r\n\r\n") }

my $sock = "$dir/fork.sock";
my $base = spawn_vassal(argv => ['--name', 'base', '--early-psgi', $app, '--fork-server', $sock,
    '--fork-server-spares', 0], stderr => $err, stdout => $err);
is read_bytes($base->{pipe}, 1, 20), "\x01", 'the base with a layered STDERR listens' or diag slurp($err);
like slurp($err), qr/^loaded caf\xc3\xa9 \xe2\x98\x83\n/m, "the app's line at load is UTF-8";

my $port = empty_port();
my $v = adopt($sock, argv => ['--name', 'lay', '--http-socket', "127.0.0.1:$port", '--processes', 1]);
ok $v->{pid}, 'adopted';
is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp($err);
my $r = get($port, '/layer');
is $r->{status}, 200, 'served';
ok wait_for(10, sub { slurp($err) =~ m{^lay 127\.0\.0\.1 - - \[[^\]]+\] "GET /layer HTTP/1\.1" 200 }m }),
    'the access log line is on the layered STDERR' or diag slurp($err);
like slurp($err), qr/^request caf\xc3\xa9 \xe2\x98\x83\n/m, "the app's line in a request is UTF-8";
like slurp($err), qr/^stdout caf\xc3\xa9 \xe2\x98\x83\n/m, "so is its STDOUT";
is get($port, '/after')->{status}, 200, 'the worker still serves after the layers changed in a request';

# an adopted vassal that fails says so in one line, on the STDERR it inherited with its layers
my $bad = adopt($sock, argv => ['--name', 'bad', '--http-socket', "127.0.0.1:" . empty_port(), '--psgi', "$dir/none.psgi"]);
ok $bad->{pid}, 'adopted with an app file that is not there';
ok wait_gone($bad->{pid}, 15), 'and gone';
like slurp($err), qr{^psgi-vassal bad: error: app file '\Q$dir\E/none\.psgi' not found$}m, 'its error line was written' or diag slurp($err);
unlike slurp($err), qr/syswrite|isn't allowed/, 'no write failed' or diag slurp($err);

syswrite $v->{pipe}, "\x02";
ok wait_gone($v->{pid}, 15), 'the vassal stops on byte 2';
close $base->{pipe};
ok wait_gone($base->{pid}, 15), 'the base stops';
unlike slurp($err), qr/syswrite|isn't allowed/, 'no write failed' or diag slurp($err);
done_testing;
