use strict;
use warnings;
use Test::More;
use Cwd ();
use File::Path qw(make_path);
use File::Temp qw(tempdir);
use IO::Select;
use POSIX ();
use Socket qw(AF_UNIX SOCK_DGRAM MSG_DONTWAIT);
use Time::HiRes ();
use ForkServer::Base::Learned ();

# What the base accepts of its vassals' reports, and how it loads them
# (ForkServer::Base::Learned), with real sockets and real processes: this
# test process plays the base.

plan skip_all => 'Linux only' unless $^O eq 'linux';

my $dir = tempdir(CLEANUP => 1);
chmod 0755, $dir;
sub module {
    my ($lib, $key, $body) = @_;
    my $file = "$lib/$key";
    make_path($file =~ s{/[^/]+\z}{}r);
    open my $fh, '>', $file or die "$file: $!";
    (my $package = $key) =~ s{/}{::}g;
    $package =~ s/\.pm\z//;
    print $fh "package $package;\nuse strict;\nuse warnings;\n$body\n1;\n";
    close $fh;
    chmod 0644, $file;
    return $file;
}

my $lib = "$dir/lib";
my $good = module($lib, 'Learned/Good.pm', 'sub hello { "hello" }');
my $dep  = module($lib, 'Learned/Dep.pm', 'require Learned::Good; sub dep { 1 }');
my $dies = module($lib, 'Learned/Dies.pm', 'die "not here\n";');
my $exits = module($lib, 'Learned/Exits.pm', 'exit 3;');
my $hooks = module($lib, 'Learned/Hooks.pm', '$SIG{__DIE__} = sub { print STDERR "hooked\n" };');
my $env  = module($lib, 'Learned/Env.pm', '$ENV{LEARNED_WAS_HERE} = 1;');
my $opens = module($lib, 'Learned/Opens.pm', 'our $FH; open $FH, "<", "/dev/null" or die;');
module($lib, 'Learned/Mismatch.pm', '');
module("$dir/other", 'Learned/Mismatch.pm', '');
module("$dir/rel", 'Learned/Relative.pm', '');
my $cwd = Cwd::getcwd();
chdir $dir or die;
unshift @INC, $lib, 'rel';

my @log;
my $children = 0;
my $learned = ForkServer::Base::Learned->new(log => sub { push @log, $_[0] }, forked => sub { $children++ });

sub send_report {
    my ($body) = @_;
    socket(my $s, AF_UNIX, SOCK_DGRAM, 0) or die $!;
    defined send($s, $body, 0, $ForkServer::Base::Learned::ADDRESS) or die "send: $!";
}
sub queued { [ @{ $learned->{queue} } ] }

subtest 'only package names, found in the base\'s own absolute @INC, the very file the vassal loaded' => sub {
    send_report(join '', map { "$_\n" }
        "Learned/Good.pm\t$good",                   # yes
        "Learned/Mismatch.pm\t$dir/other/Learned/Mismatch.pm",   # no: another file than ours
        "Learned/Relative.pm\t$dir/rel/Learned/Relative.pm",   # no: a relative @INC directory
        "../../etc/Evil.pm\t/etc/Evil.pm",           # no: not a package name
        "Learned/Missing.pm\t$lib/Learned/Missing.pm",         # no: not there
        "strict.pm\t$INC{'strict.pm'}",             # no: loaded already
        "Learned/Good.pm",                           # no: no file named
        "garbage");
    $learned->readable;
    is_deeply queued(), ['Learned/Good.pm'], 'one queued';
    send_report("Learned/Good.pm\t$good\n");
    $learned->readable;
    is_deeply queued(), ['Learned/Good.pm'], 'queued once';
};

subtest 'a report from another uid is not read' => sub {
    plan skip_all => 'needs root' unless $> == 0;
    my $nobody = getpwnam('nobody') // do { plan skip_all => 'no user nobody' };
    my $pid = fork // die;
    if (!$pid) {
        POSIX::setgid((getpwnam 'nobody')[3]);
        POSIX::setuid($nobody);
        POSIX::_exit(9) unless $< == $nobody && $> == $nobody;
        send_report("Learned/Env.pm\t$env\n");
        POSIX::_exit(0);
    }
    waitpid $pid, 0;
    is $?, 0, 'sent as nobody';
    $learned->readable;
    is_deeply queued(), ['Learned/Good.pm'], 'nothing more queued';
};

# Trials and loads, as the base's idle turns would, until nothing is left.
sub drive {
    my $batch = 0;
    my $deadline = Time::HiRes::time() + 60;
    while (($learned->pending || $learned->trial_fh) && Time::HiRes::time() < $deadline) {
        if (my $fh = $learned->trial_fh) {
            IO::Select->new($fh)->can_read(1);
            $learned->trial_readable;
            next;
        }
        $batch ||= $learned->work(until => Time::HiRes::time() + 1);
    }
    ok !$learned->pending && !$learned->trial_fh, 'all done';
    while (waitpid(-1, POSIX::WNOHANG()) > 0) { $children-- }
    return $batch;
}

subtest 'loaded after a trial, in one line' => sub {
    ok !$INC{'Learned/Good.pm'}, 'not loaded before';
    ok drive(), 'a batch loaded';
    is $INC{'Learned/Good.pm'}, $good, 'loaded from our @INC';
    is Learned::Good::hello(), 'hello', 'its code';
    is $log[-1], 'loaded 1 module its vassals loaded lazily: Learned::Good', 'one line';
    ok $ForkServer::Base::Learned::KNOWN{'Learned/Good.pm'}, 'known to what is forked from now on';
};

subtest 'a module that dies, exits or changes the process as it loads: never loaded here, never tried again' => sub {
    @log = ();
    send_report(join '', map { "$_\n" } "Learned/Dies.pm\t$dies", "Learned/Exits.pm\t$exits",
        "Learned/Hooks.pm\t$hooks", "Learned/Env.pm\t$env", "Learned/Opens.pm\t$opens", "Learned/Dep.pm\t$dep");
    $learned->readable;
    is scalar @{ queued() }, 6, 'six queued';
    my $die_hook = $SIG{__DIE__};
    drive();    # the exit ends its trial: those after it go to another
    ok !$INC{$_}, "$_ not loaded" for map { "Learned/$_.pm" } qw(Dies Exits Hooks Env Opens);
    is $INC{'Learned/Dep.pm'}, $dep, 'the good one loaded';
    is $SIG{__DIE__}, $die_hook, 'our die handler untouched';
    ok !exists $ENV{LEARNED_WAS_HERE}, 'our %ENV untouched';
    my %said = map { /not preloading (\S+), .*\(not tried again\): (.*)/ ? ($1 => $2) : () } @log;
    like $said{'Learned::Dies'}, qr/\Ait died: not here/, 'the death said' or diag explain \@log;
    like $said{'Learned::Exits'}, qr/the trial process loading it stopped: it ended/, 'the exit said';
    like $said{'Learned::Hooks'}, qr/as it loads: \$SIG\{__DIE__\} changed/, 'the hook said';
    like $said{'Learned::Env'}, qr/as it loads: %ENV changed/, 'the %ENV said';
    like $said{'Learned::Opens'}, qr/as it loads: 1 descriptor left open/, 'the descriptor said';
    is scalar(grep { /loaded lazily: Learned::Dep\z/ } @log), 1, 'the batch line';
    @log = ();
    send_report(join '', map { "$_\n" } "Learned/Dies.pm\t$dies", "Learned/Exits.pm\t$exits");
    $learned->readable;
    ok !$learned->pending, 'reported again: not tried again';
    is_deeply \@log, [], 'nothing said';
};

subtest 'a module that leaves an alarm, a process, a descriptor replaced or closed, $0 or $/ changed, or loads slowly: not loaded here' => sub {
    @log = ();
    open my $stdin, '<&', \*STDIN or die "dup STDIN: $!";
    local $ForkServer::Base::LoadTrial::SLOW = 1;    # 5 s by default
    my $slow = $ForkServer::Base::LoadTrial::SLOW;
    my %file = (
        Alarm     => module($lib, 'Learned/Alarm.pm', 'alarm 600;'),
        Forks     => module($lib, 'Learned/Forks.pm', 'our $CHILD = fork; if (defined $CHILD && !$CHILD) { sleep 60; POSIX::_exit(0) }'),
        Replaces  => module($lib, 'Learned/Replaces.pm', 'open STDIN, "<", "/dev/zero" or die;'),
        Closes    => module($lib, 'Learned/Closes.pm', 'close STDIN;'),
        Renames   => module($lib, 'Learned/Renames.pm', '$0 = "renamed";'),
        Separator => module($lib, 'Learned/Separator.pm', '$/ = undef;'),
        Slow      => module($lib, 'Learned/Slow.pm', 'select undef, undef, undef, ' . ($slow + 0.5) . ';'),
    );
    open STDIN, '<', $good or die;    # not /dev/zero, what Replaces opens
    my $name = $0;
    # Closes last: the trial goes on after it without a descriptor 0
    send_report(join '', map { "Learned/$_.pm\t$file{$_}\n" } (grep { $_ ne 'Closes' } sort keys %file), 'Closes');
    $learned->readable;
    is scalar @{ queued() }, scalar keys %file, 'all queued';
    drive();
    my $alarm = alarm 0;
    ok !$alarm, 'no alarm left in the base' or diag "alarm in $alarm s";
    if (my $child = do { no warnings 'once'; $Learned::Forks::CHILD }) { kill 'KILL', $child; waitpid $child, 0 }
    is $0, $name, '$0 untouched';
    is $/, "\n", '$/ untouched';
    ok defined(fileno STDIN) && (readlink('/proc/self/fd/0') // '') eq $good, 'our STDIN untouched';
    open STDIN, '<&', $stdin or die "STDIN back: $!";
    ok !$INC{"Learned/$_.pm"}, "Learned::$_ not loaded" for sort keys %file;
    my %said = map { /not preloading (\S+), .*\(not tried again\): (.*)/ ? ($1 => $2) : () } @log;
    like $said{'Learned::Alarm'} // '', qr/an alarm set/, 'the alarm said' or diag explain \@log;
    like $said{'Learned::Forks'} // '', qr/a process started/, 'the process said';
    like $said{'Learned::Replaces'} // '', qr/descriptor 0 replaced/, 'the replaced descriptor said';
    like $said{'Learned::Closes'} // '', qr/descriptor 0 closed/, 'the closed descriptor said';
    like $said{'Learned::Renames'} // '', qr/\$0 changed/, 'the name said';
    like $said{'Learned::Separator'} // '', qr/\$\/ changed/, 'the separator said';
    like $said{'Learned::Slow'} // '', qr/took [\d.]+ s to load/, 'the slowness said';
};

subtest 'a module that overrides a built-in everywhere, adds to UNIVERSAL or changes \@INC: not loaded here' => sub {
    @log = ();
    my %file = (
        Overrides => module($lib, 'Learned/Overrides.pm', 'BEGIN { no warnings "once"; *CORE::GLOBAL::readpipe = sub { "overridden" } }'),
        Universal => module($lib, 'Learned/Universal.pm', 'sub UNIVERSAL::learned_was_here { 1 }'),
        Inc       => module($lib, 'Learned/Inc.pm', 'push @INC, sub { return };'),
    );
    send_report(join '', map { "Learned/$_.pm\t$file{$_}\n" } sort keys %file);
    $learned->readable;
    drive();
    ok !$INC{"Learned/$_.pm"}, "Learned::$_ not loaded" for sort keys %file;
    ok !defined &CORE::GLOBAL::readpipe, 'no built-in overridden here';
    ok !UNIVERSAL::can('main', 'learned_was_here'), 'nothing added to UNIVERSAL here';
    my %said = map { /not preloading (\S+), .*\(not tried again\): (.*)/ ? ($1 => $2) : () } @log;
    like $said{'Learned::Overrides'} // '', qr/CORE::GLOBAL::readpipe defined/, 'the override said' or diag explain \@log;
    like $said{'Learned::Universal'} // '', qr/UNIVERSAL::learned_was_here defined/, 'the UNIVERSAL method said';
    like $said{'Learned::Inc'} // '', qr/\@INC changed/, 'the \@INC hook said (the base would drop it)';
};

subtest 'a trial holds none of the base\'s descriptors' => sub {
    @log = ();
    socket(my $held, AF_UNIX, SOCK_DGRAM, 0) or die;    # stands in for a spare's link, a listening socket
    local $ENV{LEARNED_PEEK} = "$dir/peek " . fileno($held);
    my $peeks = module($lib, 'Learned/Peeks.pm', 'my ($file, $fd) = split " ", $ENV{LEARNED_PEEK};'
        . ' my $what = readlink("/proc/self/fd/$fd") // "closed";'
        . ' open my $out, ">>", $file or die; print $out "$$ $what\n"; close $out;');
    send_report("Learned/Peeks.pm\t$peeks\n");
    $learned->readable;
    drive();
    open my $in, '<', "$dir/peek" or die "no trial ran: $!";
    my %seen = map { split ' ', $_, 2 } <$in>;    # pid => what it saw: the trial's, then ours
    my ($trial) = grep { $_ != $$ } keys %seen;
    ok defined $trial, 'the trial loaded it' or diag explain \%seen;
    unlike $seen{$trial // ''} // '', qr/\Asocket:/, 'the trial did not have it' or diag explain \%seen;
    is $INC{'Learned/Peeks.pm'}, $peeks, 'and the module loaded here';
};

subtest 'report(): what %INC gained since the fork, once' => sub {
    my ($r, $w);
    socket(my $sock, AF_UNIX, SOCK_DGRAM, 0) or die;
    my $pid = fork // die;
    if (!$pid) {
        require Learned::Relative;    # relative @INC directory: its path is not absolute, not sent
        require Text::Wrap;    # sent, with its file
        ForkServer::Base::Learned::report();
        ForkServer::Base::Learned::report();    # nothing new: nothing sent
        POSIX::_exit(0);
    }
    waitpid $pid, 0;
    my $hdr = $learned->{hdr};
    my @bodies;
    while (defined Socket::MsgHdr::recvmsg($learned->sock, $hdr, MSG_DONTWAIT)) { push @bodies, $hdr->buf; $hdr->buflen(70000) }
    is scalar @bodies, 1, 'one report';
    like $bodies[0] // '', qr{^Text/Wrap\.pm\t/\S+/Text/Wrap\.pm$}m, 'what it loaded, with its file';
    unlike $bodies[0] // '', qr/Relative/, 'not what came from a relative directory';
};

chdir $cwd;
done_testing;
