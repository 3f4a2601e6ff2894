use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);
use ForkServer::Config;
use ForkServer::Protocol qw(encode_packet);

my $dir = tempdir(CLEANUP => 1);
sub write_file { my ($name, $text) = @_; open my $fh, '>', "$dir/$name" or die $!; print $fh $text; close $fh; "$dir/$name" }
sub parse { ForkServer::Config->from_argv([@_]) }

subtest 'command line' => sub {
    my $c = parse('--http-socket', '127.0.0.1:9101', '--processes=3', '--env', 'A=1', '--env=B=x=y',
        '--disable-logging', '--max-requests', 100, '--name', 'app1', '--fork-server-mode', '0660');
    is $c->get('http-socket'), '127.0.0.1:9101';
    is $c->get('processes'), 3;
    is_deeply [$c->list('env')], ['A=1', 'B=x=y'], 'env accumulates, value keeps its =';
    is $c->get('disable-logging'), 1, 'flag without value';
    is $c->get('max-requests'), 100;
    is $c->name, 'app1';
    is $c->get('fork-server-mode'), 0660, 'octal';
    is parse('--workers', 4)->get('processes'), 4, 'workers is processes';
    is parse('--processes', 2, '--processes', 5)->get('processes'), 5, 'last scalar wins';
};

subtest 'defaults' => sub {
    my $c = parse();
    is $c->get('processes'), 1;
    is $c->get('listen'), 1024;
    is $c->get('fork-server-mode'), 0600;
    is $c->get('fork-server-timeout'), 5;
    is $c->get('disable-logging'), 0;
    is $c->get('psgi'), undef;
    is $c->name, 'vassal';
    is_deeply [$c->list('env')], [];
};

subtest 'ini' => sub {
    my $ini = write_file('app1.ini', <<'INI');
; a comment
# another
[other]
http-socket = 1.2.3.4:1
[uwsgi]
http-socket = 127.0.0.1:9101
processes = 2
env = APP_NAME=app1
env = GREETING=hello world
  disable-logging =
harakiri=30
INI
    my $c = parse('--ini', $ini, '--env', 'LAST=1');
    is $c->name, 'app1', 'name from the file';
    is $c->get('http-socket'), '127.0.0.1:9101', 'other sections ignored';
    is $c->get('processes'), 2;
    is_deeply [$c->list('env')], ['APP_NAME=app1', 'GREETING=hello world', 'LAST=1'], 'repeated env accumulates';
    is $c->get('disable-logging'), 1, 'empty flag value is true';
    is $c->get('harakiri'), 30;
    is parse('--ini', $ini, '--processes', 7)->get('processes'), 7, 'later command line overrides';
    is parse('--processes', 7, '--ini', $ini)->get('processes'), 2, 'later ini overrides';
    is parse('--ini', $ini, '--name', 'x')->name, 'x', '--name wins';
};

subtest 'config pipe text replaces the ini file' => sub {
    my $c = ForkServer::Config->from_argv(['--ini', '/nonexistent/app7.ini'],
        config_text => "[uwsgi]\nenv = FROM=pipe\nprocesses = 3\n");
    is $c->name, 'app7', 'name from the file name';
    is_deeply [$c->list('env')], ['FROM=pipe'];
    is $c->get('processes'), 3;
    $c = ForkServer::Config->from_argv(['--name', 'n'], config_text => "[uwsgi]\nprocesses = 4\n");
    is $c->get('processes'), 4, 'without --ini the text still applies';
};

subtest 'Emperor-side keys and template names' => sub {
    my $ini = write_file('od.ini', "[uwsgi]\non-demand = true\nhttp-socket = 127.0.0.1:9101\n");
    my $c = parse('--ini', $ini);
    is $c->get('http-socket'), '127.0.0.1:9101', 'on-demand (an Emperor key) is accepted and ignored';
    is $c->name, 'od';
    my $tmpl = write_file('app5.ini.j2', "[uwsgi]\nprocesses = 2\n");
    is parse('--ini', $tmpl)->name, 'app5', 'NAME.ini.j2 gives the name NAME';
    is(ForkServer::Config->from_argv(['--ini', '/nonexistent/app6.ini.j2'], config_text => "[uwsgi]\n")->name,
        'app6', 'also when the rendered text comes on the config pipe');
    is(ForkServer::Config->guess_name('--ini', '/x/app8.ini.j2'), 'app8', 'guess_name from a template');
    is(ForkServer::Config::name_from_file('/x/my.app.ini'), 'my.app', 'only the last extension goes');
};

subtest 'addresses' => sub {
    is_deeply [ForkServer::Config::parse_address('127.0.0.1:9101')], ['127.0.0.1', 9101];
    is_deeply [ForkServer::Config::parse_address('[::1]:9101')], ['::1', 9101];
    is_deeply [ForkServer::Config::parse_address(':9101')], [undef, 9101];
    ok !eval { ForkServer::Config::parse_address('9101'); 1 }, 'no colon';
};

subtest 'UNIX socket paths, domain names, uWSGI keys that change nothing' => sub {
    my $c = parse('--http-socket', '/run/x/app.sock', '--master', '--plugins', 'psgi',
                  '--vacuum=true', '--domain', 'App.Example.com', '--domain', '*.example.com');
    is $c->get('http-socket'), '/run/x/app.sock', 'a path';
    is parse('--http-socket', 'app.sock')->get('http-socket'), 'app.sock', 'no colon: a path (uWSGI)';
    is parse('--http-socket', ':9101')->get('http-socket'), ':9101', 'still an address';
};

subtest 'errors' => sub {
    my $bad_ini = write_file('bad.ini', "[uwsgi]\nprocesses = 2\nfrobnicate = 1\n");
    for my $case (
        [['--frobnicate', 1], qr/^unknown option '--frobnicate'$/],
        [['--processes', 0], qr/^bad value '0' for option 'processes' \(command line\): expected an integer >= 1$/],
        [['--processes', 'x'], qr/bad value 'x'/],
        [['--http-socket', 'nowhere:port'], qr/bad value 'nowhere:port' for option 'http-socket'/],
        [['--http-socket', ''], qr/bad value '' for option 'http-socket'/],
        [['--module', 'app'], qr/^uWSGI's option '--module' is not supported: use psgi = FILE\.psgi$/],
        [['--http-socket', '1.2.3.4:70000'], qr/port out of range/],
        [['--env', 'NOEQUALS'], qr/expected KEY=VALUE/],
        [['--fork-server-mode', '999'], qr/octal/],
        [['--disable-logging=maybe'], qr/boolean/],
        [['--uid', 'no-such-user-here'], qr/no such user/],
        [['--psgi'], qr/needs a value/],
        [['stray'], qr/unexpected argument 'stray'/],
        [['--ini', "$dir/missing.ini"], qr/cannot read ini file/],
        [['--ini', $bad_ini], qr/^unknown option 'frobnicate' \(.*bad.ini line 3\)$/],
    ) {
        my ($argv, $re) = @$case;
        ok !eval { parse(@$argv); 1 }, "@$argv: refused";
        like $@, $re, "@$argv: message";
        like $@, qr/\A[^\n]*\n\z/, "@$argv: one line";
    }
    is(ForkServer::Config->guess_name('--ini', '/x/app3.ini', '--bogus'), 'app3', 'guess_name from ini');
    is(ForkServer::Config->guess_name('--name=n1', '--ini', 'a.ini'), 'n1', 'guess_name from name');
};

subtest 'the program: unknown option is one line naming the vassal, exit 1' => sub {
    my $ini = write_file('app9.ini', "[uwsgi]\nhttp-socket = 127.0.0.1:1\nbogus-option = 1\n");
    my $out = `$^X perl/ForkServer.pm --ini $ini 2>&1`;
    is $? >> 8, 1, 'exit status 1';
    like $out, qr/\Apsgi-vassal app9: error: unknown option 'bogus-option' \(\S+ line 3\)\n\z/, 'one line naming the vassal';
    $out = `$^X perl/ForkServer.pm --name v2 --http-socket 127.0.0.1:1 --psgi $dir/none.psgi 2>&1`;
    is $? >> 8, 1, 'missing app: exit 1';
    like $out, qr/\Apsgi-vassal v2: error: app file '.*none.psgi' not found\n\z/, 'missing app: one line';
    my $dies = write_file('dies.psgi', "die qq{boom\\nsecond line\\n};\n");
    $out = `$^X perl/ForkServer.pm --name v3 --http-socket 127.0.0.1:1 --psgi $dies 2>&1`;
    is $? >> 8, 1, 'app dies: exit 1';
    like $out, qr/\Apsgi-vassal v3: error: cannot load app .*boom[^\n]*\n\z/, 'app dies: one line';
};

subtest 'one declaration: options.json' => sub {
    my @decl = ForkServer::Config->options;
    ok scalar(@decl) >= 20, 'the declaration is read';
    for my $o (@decl) {
        next if $o->{emperor} || $o->{type} eq 'include';
        my $key = $o->{alias} // $o->{key};
        my $c = ForkServer::Config->new;
        if (defined $o->{default}) {
            ok defined $c->get($key), "$o->{key}: has its declared default";
        }
        ok eval { $c->get($o->{key}); 1 }, "$o->{key}: known to get()";
    }
    my $c = ForkServer::Config->from_argv([], config_text => "[uwsgi]\non-demand = whatever\n");
    ok $c, 'an Emperor-only key is accepted with any value';
    is parse()->get('fork-server-hugepages'), 1, 'bool default from the declaration';
    is parse()->get('fork-server-mode'), 0600, 'octal default normalised by its checker';
};

done_testing;
