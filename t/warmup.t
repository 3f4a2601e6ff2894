use strict;
use warnings;
use Test::More;
use lib 't/lib', 'perl';
use Cwd ();
use File::Temp qw(tempdir);
use Test::TCP qw(empty_port);
use ForkServerTest::Emperor qw(become_subreaper spawn_vassal adopt read_bytes http_get wait_for wait_gone);
use ForkServer::Config ();
use ForkServer::Base::Warmup ();
use ForkServer::Spares::Rehearsal ();

plan skip_all => 'Linux only' unless $^O eq 'linux';
become_subreaper();

my $dir = tempdir(CLEANUP => 1);
my $app_file = Cwd::abs_path('t/apps/warmup.psgi');
sub slurp { open my $fh, '<', $_[0] or return ''; local $/; <$fh> }

subtest 'the option: a path, repeatable' => sub {
    my $c = ForkServer::Config->from_argv(['--early-warmup', '/', '--early-warmup=/a?b=c']);
    is_deeply [$c->list('early-warmup')], ['/', '/a?b=c'], 'accumulates';
    ok !eval { ForkServer::Config->from_argv(['--early-warmup', 'relative']); 1 }, 'not a path: refused';
    like $@, qr/bad value 'relative' for option 'early-warmup'/, 'with its reason';
};

subtest 'every kind of response is consumed; the env is a request\'s' => sub {
    my @env;
    my $app = sub { push @env, $_[0]; [200, [], ['x']] };
    is ForkServer::Base::Warmup::request($app, '/a%20b?q=1'), 200, 'status';
    my $env = $env[0];
    is $env->{REQUEST_METHOD}, 'GET';
    is $env->{PATH_INFO}, '/a b', 'PATH_INFO unescaped';
    is $env->{REQUEST_URI}, '/a%20b?q=1';
    is $env->{QUERY_STRING}, 'q=1';
    is $env->{SERVER_NAME}, 'localhost';
    is $env->{'psgi.url_scheme'}, 'http';
    is_deeply $env->{'psgi.version'}, [1, 1];
    ok $env->{'psgi.streaming'} && !$env->{'psgi.nonblocking'}, 'streaming, blocking';
    is $env->{'psgi.input'}->read(my $buf, 10), 0, 'psgi.input is empty';
    is $env->{'psgi.errors'}, *STDERR, 'psgi.errors is STDERR';

    my $closed = 0;
    my $body = Plack::Util::inline_object(getline => do { my @l = ('a', 'b'); sub { shift @l } },
                                          close => sub { $closed++ });
    is ForkServer::Base::Warmup::request(sub { [200, [], $body] }, '/'), 200, 'filehandle-like body';
    is $closed, 1, 'read to its end and closed';
    my @written;
    is ForkServer::Base::Warmup::request(sub { my $env = shift; sub {
        my $w = $_[0]->([206, []]); $w->write($_) for 1 .. 3; push @written, 3; $w->close } }, '/'), 206, 'streaming';
    is_deeply \@written, [3], 'the writer took every chunk';
    is ForkServer::Base::Warmup::request(sub { sub { $_[0]->([202, [], ['x']]) } }, '/'), 202, 'delayed';
    ok !eval { ForkServer::Base::Warmup::request(sub { sub { } }, '/') }, 'a delayed response never started dies';
    ok !eval { ForkServer::Base::Warmup::request(sub { 42 }, '/') }, 'not a response dies';
};

subtest 'the base warms up before serving; adopted vassals see the state' => sub {
    my $sock = "$dir/fs.sock";
    my $log  = "$dir/base.log";
    # the fork path: a spare's worker runs the warm-up again (the next subtest)
    my $base = spawn_vassal(argv => ['--name', 'wb', '--early-psgi', $app_file, '--fork-server', $sock,
        '--fork-server-spares', 0, map { ('--early-warmup', $_) } '/', '/dies', '/fh', '/delayed', '/stream'], stderr => $log);
    is read_bytes($base->{pipe}, 1, 30), "\x01", 'byte 1: serving after the warm-up' or diag slurp($log);
    my $text = slurp($log);
    like $text, qr{^psgi-vassal wb: early-warmup GET /: status 200 in [\d.]+ ms$}m, 'one line for /';
    like $text, qr{^psgi-vassal wb: early-warmup GET /dies failed after [\d.]+ ms \(going on\): warm-up trouble on two lines$}m,
        'a dying path: one line';
    like $text, qr{early-warmup GET /fh: status 200 }, 'filehandle body';
    like $text, qr{early-warmup GET /delayed: status 202 }, 'delayed response';
    like $text, qr{early-warmup GET /stream: status 206 }, 'streaming response';
    my @order = $text =~ m{early-warmup GET (/\w*)}g;
    is_deeply \@order, ['/', '/dies', '/fh', '/delayed', '/stream'], 'in the given order, the failure included';

    my $port = empty_port();
    my $v = adopt($sock, argv => ['--name', 'wa', '--http-socket', "127.0.0.1:$port"]);
    ok $v->{pid}, 'adopted after the warm-up';
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'loyal' or diag slurp($log);
    my $res = http_get($port, 20) // '';
    like $res, qr{seen=/\($base->{pid}\),/dies\($base->{pid}\),/fh\($base->{pid}\),/delayed\($base->{pid}\),/stream\($base->{pid}\)\n},
        'the vassal\'s first request sees the state the warm-up built in the base';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'vassal stops';
    close $base->{pipe};
    ok wait_gone($base->{pid}, 15), 'base stops';
};

subtest 'a warm spare: its first worker ran the warm-up itself, and serves the adoption' => sub {
    my $sock = "$dir/fs3.sock";
    my $log  = "$dir/base3.log";
    my $base = spawn_vassal(argv => ['--name', 'wsb', '--early-psgi', $app_file, '--fork-server', $sock,
        '--fork-server-spares', 1, '--early-warmup', '/'], stderr => $log);
    is read_bytes($base->{pipe}, 1, 30), "\x01", 'byte 1' or diag slurp($log);
    # the spare is our child (clone(CLONE_PARENT): we are the base's parent)
    my $spare;
    my $deadline = time + 30;
    until ($spare || time > $deadline) {
        ($spare) = grep { title_of($_) eq "psgi-vassal wsb (spare of $base->{pid})" } all_pids();
        select undef, undef, undef, 0.02 unless $spare;
    }
    ok $spare, 'a warm spare' or diag slurp($log);
    is ppid_of($spare), $$, 'born our child, as an adopted vassal';
    is session_of($spare), $spare, 'it leads its own session';
    my ($worker) = grep { ppid_of($_) == $spare } all_pids();
    ok $worker, 'with its first worker';
    is session_of($worker), $spare, 'in the same session';
    my $port = empty_port();
    my $v = adopt($sock, argv => ['--name', 'wsa', '--http-socket', "127.0.0.1:$port", '--processes', 2]);
    is $v->{pid}, $spare, 'the adoption went to the spare';
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'loyal' or diag slurp($log);
    my %seen;
    for (1 .. 100) {
        my $res = http_get($port, 20) // '';
        $seen{$1} = $res if $res =~ /pid=(\d+)/;
        last if $seen{$worker};
    }
    # the worker's own: each path as often as the rehearsals (ForkServer::Spares::Rehearsal)
    my $own = join '', (",/\\($worker\\)") x ForkServer::Spares::Rehearsal::TIMES;
    like $seen{$worker} // '', qr{seen=/\($base->{pid}\)$own\n},
        'the warm worker answers, with the base\'s warm-up and its own';
    unlike $seen{$worker} // '', qr{rehearsal}, 'the app never saw the rehearsal\'s request';
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'vassal stops';
    ok !kill(0, $worker) || wait_gone($worker, 15), 'its warm worker too';
    close $base->{pipe};
    ok wait_gone($base->{pid}, 15), 'base stops';
};

subtest 'an adopted vassal leads its own session' => sub {
    my $sock = "$dir/fs2.sock";
    my $log  = "$dir/base2.log";
    my $base = spawn_vassal(argv => ['--name', 'sb', '--early-psgi', $app_file, '--fork-server', $sock], stderr => $log);
    is read_bytes($base->{pipe}, 1, 30), "\x01", 'byte 1' or diag slurp($log);
    is session_of($base->{pid}), $base->{pid}, 'the base (under an Emperor) leads its session';
    my $port = empty_port();
    my $v = adopt($sock, argv => ['--name', 'sa', '--http-socket', "127.0.0.1:$port", '--processes', 2]);
    is read_bytes($v->{pipe}, 3, 20), "\x01\x05\x11", 'loyal' or diag slurp($log);
    like http_get($port, 20) // '', qr/pid=/, 'serving';
    is session_of($v->{pid}), $v->{pid}, 'the adopted vassal leads its session';
    my @workers = grep { ppid_of($_) == $v->{pid} } all_pids();
    is scalar @workers, 2, 'two workers';
    is session_of($_), $v->{pid}, "worker $_ is in it" for @workers;
    syswrite $v->{pipe}, "\x02";
    ok wait_gone($v->{pid}, 15), 'vassal stops';
    close $base->{pipe};
    ok wait_gone($base->{pid}, 15), 'base stops';
};

sub stat_fields {
    my $s = slurp("/proc/$_[0]/stat");
    $s =~ s/\A.*\)\s+//s;
    return split ' ', $s;    # state ppid pgrp session ...
}
sub session_of { (stat_fields($_[0]))[3] // -1 }
sub ppid_of    { (stat_fields($_[0]))[1] // -1 }
sub title_of   { my $t = slurp("/proc/$_[0]/cmdline") // ''; $t =~ s/[\0 ]+\z//; $t }
sub all_pids   { map { m{/(\d+)\z} ? $1 : () } glob '/proc/[0-9]*' }

done_testing;
