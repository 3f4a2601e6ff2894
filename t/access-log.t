use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use Test::TCP qw(empty_port);
use ForkServerTest::Emperor qw(become_subreaper spawn_vassal adopt read_bytes wait_for wait_gone);
use ForkServerTest::HTTP qw(http_raw);

# The access-log key: the log goes to its own file, reopened on
# reload; disable-logging still wins; a file that cannot be opened is one
# line and exit 1.
plan skip_all => 'Linux only' unless $^O eq 'linux';
become_subreaper();
my $dir = tempdir(CLEANUP => 1);
my $hello = Cwd::abs_path('t/apps/hello.psgi');
sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> }
sub get { my ($port, $path) = @_; http_raw($port, "GET $path HTTP/1.1\r\nHost: x\r\nUser-Agent: al-test\r\nConnection: close\r\n\r\n") }

subtest 'access-log FILE: lines there, not on stderr; reopened on reload' => sub {
    my $port = empty_port();
    my $file = "$dir/access.log";
    my $v = spawn_vassal(argv => ['--name', 'al', '--http-socket', "127.0.0.1:$port", '--psgi', $hello,
        '--processes', 2, '--access-log', $file], stderr => "$dir/al.stderr");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/al.stderr");
    is get($port, '/first')->{status}, 200, 'served';
    ok wait_for(10, sub { slurp($file) =~ m{^al 127\.0\.0\.1 - - \[[^\]]+\] "GET /first HTTP/1\.1" 200 \d+ "-" "al-test" \d+\.\d{6}\n\z}m }),
        'the line is in the file, combined format with the time taken' or diag slurp($file);
    unlike slurp("$dir/al.stderr"), qr{/first}, 'and not on stderr';

    # rotated away, then a reload: the new workers write to a new file at the path
    rename $file, "$file.1" or die $!;
    syswrite $v->{pipe}, "\x01";
    my $n = 0;
    ok wait_for(20, sub { get($port, '/after-' . ++$n); slurp($file) =~ m{"GET /after-\d+ HTTP/1\.1" 200 } }),
        'after the reload, lines go to a new file at the path' or diag slurp("$dir/al.stderr");
    like slurp("$file.1"), qr{"GET /first HTTP/1\.1" 200 }, 'the rotated file kept its lines';
    unlike slurp($file), qr{/first}, 'the new file has only new lines';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stops on byte 2';
    unlike slurp("$dir/al.stderr"), qr/cannot|error/, 'nothing went wrong' or diag slurp("$dir/al.stderr");
};

subtest 'an adopted vassal opens its own access-log' => sub {
    my $sock = "$dir/fork.sock";
    my $base = spawn_vassal(argv => ['--name', 'base', '--early-psgi', $hello, '--fork-server', $sock],
        stderr => "$dir/base.stderr");
    is read_bytes($base->{pipe}, 1, 20), "\x01", 'base listens' or diag slurp("$dir/base.stderr");
    my $port = empty_port();
    my $file = "$dir/adopted.log";
    my $v = adopt($sock, argv => ['--name', 'ad', '--http-socket', "127.0.0.1:$port", '--access-log', $file]);
    ok $v->{pid}, 'adopted';
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/base.stderr");
    is get($port, '/adopted')->{status}, 200, 'served';
    ok wait_for(10, sub { slurp($file) =~ m{^ad 127\.0\.0\.1 - - \[[^\]]+\] "GET /adopted HTTP/1\.1" 200 \d+ "-" "al-test" \d+\.\d{6}\n\z}m }),
        'its line is in its file' or diag slurp($file) . slurp("$dir/base.stderr");
    unlike slurp("$dir/base.stderr"), qr{/adopted}, 'not on stderr';
    close $v->{pipe};
    ok wait_gone($v->{pid}, 15), 'the vassal stops on end of file';
    close $base->{pipe};
    ok wait_gone($base->{pid}, 15), 'the base stops';
};

subtest 'disable-logging wins over access-log' => sub {
    my $port = empty_port();
    my $file = "$dir/never.log";
    my $v = spawn_vassal(argv => ['--name', 'quiet', '--http-socket', "127.0.0.1:$port", '--psgi', $hello,
        '--access-log', $file, '--disable-logging'], stderr => "$dir/quiet.stderr");
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'bytes 1, 5, 17' or diag slurp("$dir/quiet.stderr");
    is get($port, '/q')->{status}, 200, 'served';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'stopped (every request was logged or not by then)';
    ok !-e $file, 'no file';
    unlike slurp("$dir/quiet.stderr"), qr{/q}, 'nothing on stderr';
};

subtest 'an access-log that cannot be opened: one line, exit 1' => sub {
    my $port = empty_port();
    my $out = `$^X perl/ForkServer.pm --name nolog --http-socket 127.0.0.1:$port --psgi $hello --access-log $dir/no/such/dir/a.log 2>&1`;
    is $? >> 8, 1, 'exit 1';
    like $out, qr{\Apsgi-vassal nolog: error: cannot open access-log '\Q$dir\E/no/such/dir/a\.log': No such file or directory\n\z}, 'one line';
};

done_testing;
