use strict;
use warnings;
use Test::More;
use lib 't/lib';
use Cwd ();
use File::Temp qw(tempdir);
use IO::Socket::INET;
use Socket qw(AF_UNIX SOCK_STREAM PF_UNSPEC);
use Test::TCP qw(empty_port);
use ForkServer::Protocol qw(encode_packet encode_array);
use ForkServerTest::Emperor qw(
    become_subreaper spawn_vassal adopt send_request read_bytes read_reply http_get
    wait_for wait_gone stop_pid fd_targets socket_inode_of_path program
);

plan skip_all => 'Linux only (/proc, SO_PEERCRED)' unless $^O eq 'linux';
ok become_subreaper(), 'the test is a subreaper, like the Emperor' or diag 'adopted vassals go to pid 1';

my $dir  = tempdir(CLEANUP => 1);
my $sock = "$dir/fork.sock";
my $log  = "$dir/base.log";
my $hello = Cwd::abs_path('t/apps/hello.psgi');
my $other = Cwd::abs_path('t/apps/other.psgi');

sub write_file { my ($name, $text) = @_; open my $fh, '>', "$dir/$name" or die $!; print $fh $text; close $fh; "$dir/$name" }
sub log_text { open my $fh, '<', $log or return ''; local $/; <$fh> }

write_file('base.ini', <<"INI");
[uwsgi]
early-psgi = $hello
fork-server = $sock
fork-server-timeout = 2
# the fork path itself, its descriptors and processes: no warm spares (tests/test_spares.py has them)
fork-server-spares = 0
INI

my $base = spawn_vassal(argv => ['--ini', "$dir/base.ini"], stderr => $log);
is read_bytes($base->{pipe}, 1, 20), "\x01", 'base vassal: byte 1 once its socket listens'
    or BAIL_OUT("base did not start: " . log_text());
ok -S $sock, 'fork-server socket exists';
is((stat $sock)[2] & 07777, 0600, 'socket mode 0600');
my $listen_inode = socket_inode_of_path($sock);
ok $listen_inode, "fork-server socket inode $listen_inode";
my $base_fds_before = fd_targets($base->{pid});

# Checks a running adopted vassal: pipe bytes, HTTP answer, descriptors.
sub check_vassal {
    my ($v, %want) = @_;
    my $what = $want{name};
    ok $v->{pid} && $v->{pid} =~ /^\d+$/ && $v->{pid} != $base->{pid}, "$what: pid reply ($v->{pid})"
        or return diag log_text();
    diag sprintf "%s: adoption request to pid reply %.1f ms", $what, 1000 * $v->{elapsed};
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", "$what: bytes 1, 5, 17 on its pipe";
    my $res = http_get($want{port}, 10) // '';
    like $res, qr{^HTTP/1\.[01] 200}, "$what: HTTP 200";
    my ($served_by) = $res =~ /pid=(\d+)/;
    ok $served_by && ($served_by == $v->{pid} || _ppid($served_by) == $v->{pid}),
        "$what: answered by the vassal or its worker";
    like $res, qr/app=$want{app} APP_NAME=\Q$want{app_name}\E\n/, "$what: its app, its env";
    like $res, qr/loaded_in=$base->{pid}/, "$what: app preloaded by the base" if $want{app} eq 'hello';

    # Only stdio, its pipe(s) and its own sockets: nothing the base holds.
    my $base_now = { map { $_ => 1 } grep { /^socket:/ } values %{ fd_targets($base->{pid}) } };
    my $mine = fd_targets($v->{pid});
    my @shared = grep { $_ > 2 && $base_now->{ $mine->{$_} } } keys %$mine;
    is_deeply \@shared, [], "$what: holds no descriptor of the base" or diag explain $mine;
    ok !(grep { $_ eq "socket:[$listen_inode]" } values %$mine), "$what: not the fork-server socket";
    # a memory file (the workers' board of free workers) is on no disk
    ok !(grep { $_ > 2 && $mine->{$_} !~ m{^(?:(?:socket|pipe|anon_inode):|/memfd:)} } keys %$mine),
        "$what: no files beyond stdio" or diag explain $mine;
    my @inheritable = grep { $_ > 2 && !_cloexec($v->{pid}, $_) } keys %$mine;
    is_deeply \@inheritable, [], "$what: every descriptor beyond stdio is close-on-exec";
    return;
}

sub _cloexec {
    my ($pid, $fd) = @_;
    open my $fh, '<', "/proc/$pid/fdinfo/$fd" or return 0;
    my ($flags) = join('', <$fh>) =~ /^flags:\s*([0-7]+)/m;
    return oct("0" . ($flags // 0)) & 02000000;    # O_CLOEXEC
}

sub _ppid {
    my ($pid) = @_;
    open my $fh, '<', "/proc/$pid/stat" or return 0;
    my ($ppid) = <$fh> =~ /\)\s+\S+\s+(\d+)/;
    return $ppid // 0;
}

# 1. An adopted vassal from an ini file, the preloaded app, env from the file.
my $port1 = empty_port();
my $ini1 = write_file('app1.ini', "[uwsgi]\nhttp-socket = 127.0.0.1:$port1\nenv = APP_NAME=app1\nenv = OTHER=x\n");
my $app1 = adopt($sock, argv => ['--ini', $ini1]);
check_vassal($app1, name => 'app1', port => $port1, app => 'hello', app_name => 'app1');
like do { open my $fh, '<', "/proc/$app1->{pid}/cmdline"; local $/; <$fh> // '' }, qr/^psgi-vassal app1/,
    'app1: process title';

# 2. psgi loaded on top, served on an on-demand socket passed as descriptor 0.
my $ondemand = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 0, Listen => 16, ReuseAddr => 1) or die $!;
my $port2 = $ondemand->sockport;
my $app2 = adopt($sock, argv => ['--name', 'app2', '--psgi', $other, '--env', 'APP_NAME=app2'], ondemand => $ondemand);
close $ondemand;
check_vassal($app2, name => 'app2', port => $port2, app => 'other', app_name => 'app2');

# 3. Configuration from the config pipe, in place of the --ini file.
my $port3 = empty_port();
my $app3 = adopt($sock, argv => ['--ini', "$dir/not-there/app3.ini"],
    config_text => "[uwsgi]\nhttp-socket = 127.0.0.1:$port3\nenv = APP_NAME=from-config-pipe\n");
check_vassal($app3, name => 'app3', port => $port3, app => 'hello', app_name => 'from-config-pipe');

# 4. Malformed requests: each is refused, closes what it brought, logs a line.
sub refused_ok {
    my ($what, $bytes, %args) = @_;
    my @pairs;
    for (1 .. ($args{fds} // 1)) {
        socketpair(my $ours, my $theirs, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die "socketpair: $!";
        push @pairs, [$ours, $theirs];
    }
    my $client = send_request($sock, $bytes, map { fileno $_->[1] } @pairs);
    shutdown($client, 1) if $args{shutdown};
    close $_->[1] for @pairs;
    is read_reply($client, 10), undef, "$what: connection closed without a reply";
    # our end sees end of file only once the base closed its copy too
    is read_bytes($_->[0], 1, 10), '', "$what: the base closed the descriptor it received" for @pairs;
}
my $good = encode_array(program(), '--name', 'x');
my $count_refused = () = log_text() =~ /refused request/g;
refused_ok('wrong modifier1', encode_packet(0, 1, $good));
refused_ok('truncated body', substr(encode_packet(35, 1, $good), 0, 10), shutdown => 1);
refused_ok('array item past the end', encode_packet(35, 1, "\x02\x00ab\x50\x00cd"));
refused_ok('zero descriptors', encode_packet(35, 1, $good), fds => 0);
refused_ok('mask announces 2 descriptors, 1 sent', encode_packet(35, 3, $good));
refused_ok('4 descriptors', encode_packet(35, 7, $good), fds => 4);
refused_ok('unknown mask bit', encode_packet(35, 0x11, $good));
refused_ok('a socket for the cgroup directory (mask 0x08)', encode_packet(35, 0x09, $good), fds => 2);
refused_ok('argv not UTF-8', encode_packet(35, 1, encode_array(program(), "--name", "\xff\xfe")));
refused_ok('empty argv', encode_packet(35, 1, ''));
refused_ok('trailing garbage', encode_packet(35, 1, $good) . 'xyz');
# a readiness probe (the Emperor's: it connects and closes, sending nothing)
# is no refused request: no line (the count below stays 13)
IO::Socket::UNIX->new(Peer => $sock, Type => SOCK_STREAM)->close for 1 .. 3;

# A client that connects, sends a little and stalls delays nobody.
socketpair(my $stall_ours, my $stall_theirs, AF_UNIX, SOCK_STREAM, PF_UNSPEC) or die $!;
my $stalled = send_request($sock, "\x23\x40", fileno $stall_theirs);
close $stall_theirs;
my $quiet = IO::Socket::UNIX->new(Peer => $sock, Type => SOCK_STREAM) or die $!;    # sends nothing at all
my $port4 = empty_port();
my $app4 = adopt($sock, argv => ['--name', 'app4', '--http-socket', "127.0.0.1:$port4", '--env', 'APP_NAME=app4'], timeout => 1);
ok $app4->{pid}, 'a good request adopts while two clients stall';
cmp_ok $app4->{elapsed}, '<', 1, 'and is not delayed by them';
check_vassal($app4, name => 'app4', port => $port4, app => 'hello', app_name => 'app4');
is read_reply($stalled, 10), undef, 'the stalled client is dropped after its timeout';
is read_bytes($stall_ours, 1, 10), '', 'and its descriptor closed';
is read_reply($quiet, 10), undef, 'the silent client is dropped after its timeout';

# The base closes a refused client before it logs: wait for the last line.
my $refused_now = sub { (() = log_text() =~ /refused request/g) - $count_refused };
wait_for(10, sub { $refused_now->() >= 13 });
my $log_now = log_text();
is $refused_now->(), 13, '13 refusals, one log line each' or diag $log_now;
like $log_now, qr/received descriptor \d+ \(mask 0x08\) is not a directory/, 'the cgroup descriptor must be a directory';
like $log_now, qr/refused request from pid \d+ uid \d+ \(1 descriptors closed\): wrong modifier1 0/, 'log names peer and cause';

is_deeply fd_targets($base->{pid}), $base_fds_before, 'refused requests leak no descriptor in the base';

# 5. Stopping adopted vassals: byte 2, end of file, byte 0.
syswrite $app1->{pipe}, "\x02";
ok wait_gone($app1->{pid}, 15), 'app1 stops on byte 2';
close $app2->{pipe};
ok wait_gone($app2->{pid}, 15), 'app2 stops on end of file';
syswrite $app3->{pipe}, "\x00";
ok wait_gone($app3->{pid}, 15), 'app3 stops on byte 0';

# 6. The base stops on byte 2; the adopted vassal it forked keeps running.
syswrite $base->{pipe}, "\x02";
ok wait_gone($base->{pid}, 15), 'base stops on byte 2';
ok !-e $sock, 'and removes its socket';
ok kill(0, $app4->{pid}), 'app4 outlives the base';
like http_get($port4, 10) // '', qr/APP_NAME=app4/, 'and still answers';
close $app4->{pipe};
ok wait_gone($app4->{pid}, 15), 'app4 stops on end of file';

done_testing;
