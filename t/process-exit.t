use strict;
use warnings;
use Test::More;
use File::Temp qw(tempdir);

# ForkServer::Process::Exit's fast exit, in real processes: the END blocks
# compiled before the module (which perl would run after its own) run
# exactly once, after the later ones, whether the process was forked from
# a base that called mark_base or not.

my $dir = tempdir(CLEANUP => 1);

sub run_program {
    my ($mark) = @_;
    my $log = "$dir/log-$mark";
    my $program = <<"PERL";
open my \$log, '>>', '$log' or die;
\$log->autoflush(1);
END { print \$log "earlier \$\$\\n" }
BEGIN { require ForkServer::Process::Exit }
END { print \$log "later \$\$\\n" }
ForkServer::Process::Exit::mark_base() if $mark;
my \$pid = fork // die;
if (!\$pid) {
    ForkServer::Process::Exit::without_global_destruction();
    print \$log "child \$\$\\n";
    exit 3;
}
waitpid \$pid, 0;
print \$log "status " . (\$? >> 8) . " of \$pid\\n";
POSIX::_exit(0);
PERL
    system($^X, '-Iperl', '-MPOSIX', '-e', $program) == 0 or die "program failed: $?";
    return lines_of($log);
}

# Runs PROGRAM (perl -e, with perl/ and the INC directories) with a log
# file of its own as its first argument, then ARGS; the lines it logged.
sub logged_lines {
    my (%a) = @_;
    my $log = "$dir/log-$a{name}";
    system($^X, '-Iperl', (map {"-I$_"} @{ $a{inc} || [] }), '-MPOSIX', '-e', $a{program}, $log, @{ $a{args} || [] }) == 0
        or die "program failed: $?";
    return lines_of($log);
}

sub lines_of {
    my ($log) = @_;
    open my $fh, '<', $log or die "$log: $!";
    my @lines = <$fh>;
    chomp @lines;
    return @lines;
}

for my $mark (0, 1) {
    my @lines = run_program($mark);
    my ($status) = grep {/\Astatus/} @lines;
    my ($child) = $status =~ /of (\d+)\z/;
    is_deeply [grep { !/\Astatus/ && / $child\z/ } @lines], ["child $child", "later $child", "earlier $child"],
        ($mark ? 'from a marked base' : 'unmarked') . ': the END blocks after, then the one before, each once';
    like $status, qr/\Astatus 3 /, 'the exit status is kept';
}

# A module the process required itself, under a top-level name the base
# had (MyApp::Plugin under a preloaded MyApp): its variables are freed at
# exit, as a new top-level package's are, so their objects' DESTROY runs.
{
    my $lib = "$dir/lib";
    mkdir $_ or die "$_: $!" for $lib, "$lib/Known";
    open my $pm, '>', "$lib/Known/Fresh.pm" or die;
    print $pm "package Known::Fresh; our \$OBJ = bless {}, 'Known::Probe'; 1;\n";
    close $pm or die;
    my $program = <<'PERL';
BEGIN { require ForkServer::Process::Exit }
my $log = shift;
sub note { open my $l, '>>', $log or die; print $l "@_\n" }
{ package Known; our $X = 1 }
{ package Known::Probe; sub DESTROY { main::note("DESTROY $$") } }
ForkServer::Process::Exit::mark_base();
my $pid = fork // die;
if (!$pid) {
    ForkServer::Process::Exit::without_global_destruction();
    require Known::Fresh;
    exit 0;
}
waitpid $pid, 0;
note("child $pid");
POSIX::_exit(0);
PERL
    my @lines = logged_lines(name => 'nested', program => $program, inc => [$lib]);
    my ($child) = map { /\Achild (\d+)\z/ ? $1 : () } @lines;
    is_deeply [grep { !/\Achild/ } @lines], ["DESTROY $child"],
        'a module under a name the base had, required by the process: its objects destroyed at exit';
}

# A variable whose name is not ASCII (`use utf8`), in a name the process
# made itself: freed too, as any other.
{
    my $program = <<'PERL';
BEGIN { require ForkServer::Process::Exit }
my $log = shift;
sub note { open my $l, '>>', $log or die; print $l "@_\n" }
{ package Probe; sub DESTROY { main::note("DESTROY $_[0]{name} $$") } }
ForkServer::Process::Exit::mark_base();
my $pid = fork // die;
if (!$pid) {
    ForkServer::Process::Exit::without_global_destruction();
    eval q{ use utf8; our $Ünïcache = bless { name => 'main' }, 'Probe';
            package Frësh; our $Çache = bless { name => 'package' }, 'Probe'; 1 } or die $@;
    exit 0;
}
waitpid $pid, 0;
note("child $pid");
POSIX::_exit(0);
PERL
    my @lines = logged_lines(name => 'utf8', program => $program);
    my ($child) = map { /\Achild (\d+)\z/ ? $1 : () } @lines;
    is_deeply [sort grep { !/\Achild/ } @lines], ["DESTROY main $child", "DESTROY package $child"],
        'variables named in utf8: their objects destroyed at exit';
}

# A child that loads Moo and not Moose: Moo's placeholder in
# $Moose::AUTHORITY is freed with the new package Moose::, and its DESTROY
# (outside perl's global destruction) would load Moose's meta-object
# protocol and inflate every Moo class: 30 to 70 ms in each such process.
SKIP: {
    skip 'Moo is not installed', 1 unless eval { require Moo; 1 };
    my $program = <<'PERL';
BEGIN { require ForkServer::Process::Exit }
my $log = shift;
sub note { open my $l, '>>', $log or die; print $l "@_\n" }
ForkServer::Process::Exit::mark_base();
my $pid = fork // die;
if (!$pid) {
    ForkServer::Process::Exit::without_global_destruction();
    unshift @INC, sub { main::note("require $_[1]") if $_[1] =~ m{\A(?:Moose|Class/MOP)\b}; return };
    eval q{ package Thing; use Moo; has name => (is => 'ro'); 1 } or die $@;
    our $thing = Thing->new(name => 'x');
    exit 0;
}
waitpid $pid, 0;
note("child $pid");
POSIX::_exit(0);
PERL
    my @lines = logged_lines(name => 'moo', program => $program);
    is_deeply [grep { !/\Achild/ } @lines], [], 'a Moo class freed at exit loads no Moose';
}

# unless_own_most: a process that loaded more module files than it
# inherited leaves by perl's global destruction (its objects' DESTROY see
# the DESTRUCT phase); one that loaded fewer, by the fast exit (END).
{
    my $lib = "$dir/many";
    mkdir $lib or die "$lib: $!";
    for my $i (1 .. 200) {
        open my $pm, '>', "$lib/Many$i.pm" or die;
        print $pm "package Many$i; 1;\n";
        close $pm or die;
    }
    for my $many (0, 1) {
        my $program = <<'PERL';
BEGIN { require ForkServer::Process::Exit }
my ($log, $many) = @ARGV;
sub note { open my $l, '>>', $log or die; print $l "@_\n" }
{ package Probe; sub DESTROY { main::note("DESTROY ${^GLOBAL_PHASE}") } }
ForkServer::Process::Exit::mark_base();
my $pid = fork // die;
if (!$pid) {
    ForkServer::Process::Exit::without_global_destruction(unless_own_most => 1);
    # more than the base's %INC again (it is well under 200 files)
    if ($many) { require "Many$_.pm" for 1 .. keys(%INC) + 5 }
    eval q{ package Fresh; our $obj = bless {}, 'Probe'; 1 } or die $@;
    exit 0;
}
waitpid $pid, 0;
POSIX::_exit(0);
PERL
        my @lines = logged_lines(name => "own-most-$many", program => $program, inc => [$lib], args => [$many]);
        is_deeply \@lines, [$many ? 'DESTROY DESTRUCT' : 'DESTROY END'],
            $many ? 'loaded more than it inherited: perl\'s global destruction'
                  : 'loaded less: the fast exit';
    }
}

done_testing;
