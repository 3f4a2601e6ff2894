package ForkServer::Config;
use strict;
use warnings;

use File::Basename ();
use File::Spec ();

# Option types. Names of options follow uWSGI where uWSGI has the option.
my $UINT  = sub { $_[0] =~ /\A\d+\z/ ? 0 + $_[0] : die "expected a non-negative integer\n" };
my $COUNT = sub { $_[0] =~ /\A\d+\z/ && $_[0] >= 1 ? 0 + $_[0] : die "expected an integer >= 1\n" };
my $STR   = sub { length $_[0] ? $_[0] : die "expected a non-empty value\n" };
my $BOOL  = sub {
    my $v = lc $_[0];
    return 1 if $v =~ /\A(?:|1|true|yes|on)\z/;
    return 0 if $v =~ /\A(?:0|false|no|off)\z/;
    die "expected a boolean (1/0, true/false, yes/no, on/off)\n";
};
my $OCTAL = sub { $_[0] =~ /\A0?[0-7]{3,4}\z/ ? oct $_[0] : die "expected an octal mode like 0600\n" };
my $UID   = sub {
    return 0 + $_[0] if $_[0] =~ /\A\d+\z/;
    my $uid = (getpwnam $_[0])[2];
    defined $uid ? $uid : die "no such user\n";
};
my $GID = sub {
    return 0 + $_[0] if $_[0] =~ /\A\d+\z/;
    my $gid = (getgrnam $_[0])[2];
    defined $gid ? $gid : die "no such group\n";
};
my $ENV_PAIR = sub { $_[0] =~ /\A[^=]+=/s ? $_[0] : die "expected KEY=VALUE\n" };
my $ADDR = sub { parse_address($_[0]); $_[0] };
# a UNIX socket path (it has a /, or no :, as uWSGI reads it) or HOST:PORT
my $SOCKET_ADDR = sub {
    length $_[0] or die "expected HOST:PORT or a UNIX socket path\n";
    $_[0] =~ m{/} || $_[0] !~ /:/ ? $_[0] : $ADDR->($_[0]);
};
my $DOMAIN = sub {
    my $d = lc $_[0];
    $d =~ /\A(?:\*\.)?[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*\z/ && length $d <= 253
        ? $d : die "expected a host name (app.example.com) or a wildcard (*.example.com)\n";
};
my $URL_PATH = sub { $_[0] =~ m{\A/[^\s#]*\z} ? $_[0] : die "expected a path starting with / (a query string may follow)\n" };

# The checker of each option type: returns the normalised value or dies with
# the reason. psgi_forkserver/config/options.py validates the same types.
my %CHECK = (
    string    => $STR,
    path      => $STR,
    'url-path' => $URL_PATH,
    octal     => $OCTAL,
    user      => $UID,
    group     => $GID,
    count     => $COUNT,
    uint      => $UINT,
    bool      => $BOOL,
    address   => $ADDR,
    'socket-address' => $SOCKET_ADDR,
    domain    => $DOMAIN,
    owner     => sub { my ($u, $g) = split /:/, $_[0], 2; $UID->($u); $GID->($g) if defined $g; $_[0] },
    env       => $ENV_PAIR,
    include   => $STR,
);

# PLACK_ENV of a vassal without a plack-env key: the one this program found
# in its environment when it started (the Emperor's --plack-env), else
# deployment, as Plack servers do. Taken as the module loads, so that a
# vassal adopted from a base sees the Emperor's value, not the base's own.
our $INHERITED_PLACK_ENV = (defined $ENV{PLACK_ENV} && length $ENV{PLACK_ENV}) ? $ENV{PLACK_ENV} : 'deployment';

# The options themselves are declared once, in options.json next to this
# file, which the Emperor reads too (one table of known keys for both sides).
our $OPTIONS_FILE = File::Spec->catfile(File::Basename::dirname(__FILE__), 'options.json');
my (%OPTIONS, %DEFAULTS, @DECLARED, %REFUSED);
{
    open my $fh, '<:raw', $OPTIONS_FILE or die "cannot read $OPTIONS_FILE: $!\n";
    # JSON::XS when installed: a third of JSON::PP's load time, at every start
    my $json = eval { require JSON::XS; JSON::XS->new } || do { require JSON::PP; JSON::PP->new };
    my $decl = $json->decode(do { local $/; <$fh> });
    @DECLARED = @{ $decl->{options} };
    %REFUSED = %{ $decl->{refused} // {} };
    for my $o (@DECLARED) {
        my $check = $CHECK{ $o->{type} } or die "$OPTIONS_FILE: $o->{key}: unknown type '$o->{type}'\n";
        my %spec = (check => $check);
        $spec{list}  = 1 if $o->{repeat} && $o->{type} ne 'include';
        $spec{flag}  = 1 if $o->{flag};
        $spec{alias} = $o->{alias} if defined $o->{alias};
        $spec{special} = 1 if $o->{type} eq 'include';
        # keys only the Emperor reads: accepted with any value and ignored,
        # since the vassal reads the same file
        %spec = (check => sub { $_[0] }, ignored => 1) if $o->{emperor};
        # uWSGI's harmless keys: checked, then ignored
        $spec{ignored} = 1 if $o->{ignored};
        $OPTIONS{ $o->{key} } = \%spec;
        $DEFAULTS{ $o->{key} } = $check->($o->{default}) if defined $o->{default} && !$o->{emperor};
    }
}

=head1 NAME

ForkServer::Config - the vassal's options, from argv, --ini files and the Emperor's config pipe

=head1 SYNOPSIS

  my $config = ForkServer::Config->from_argv(\@ARGV, config_text => $text_or_undef);
  $config->get('http-socket');     # scalar option (undef if unset and no default)
  $config->list('env');            # list option
  $config->name;                   # --name, else the --ini file's name (app1.ini, app1.ini.j2: app1)

=head1 DESCRIPTION

Options are applied in order: a scalar option given twice keeps the last
value, a list option (C<env>, C<fork-server-allow-uid>, C<early-warmup>)
accumulates.
C<--ini FILE> reads the C<[uwsgi]> section of FILE at the point where it
appears. When C<config_text> is given (the body read from the Emperor's
config pipe), it takes the place of the first C<--ini> file; the file name
then only gives the vassal its name.

Every option is declared once, with its type, whether it repeats, its
default and a description, in F<options.json> next to this module; the
Emperor (psgi_forkserver/config/options.py) reads the same file to judge vassal
files. This module keeps one checker per type. Adding an option is one line
there. Keys only the Emperor reads (C<on-demand>, marked C<emperor>) are
accepted and ignored.

Errors (unknown option, bad value, unreadable file) die with a one-line
message ending in a newline.

=cut

=head2 options()

The declaration (options.json's C<options>), for tools and tests.

=cut

sub options { return @DECLARED }

sub new {
    my ($class) = @_;
    return bless { opt => {}, ini_name => undef }, $class;
}

sub from_argv {
    my ($class, $argv, %args) = @_;
    my $self = $class->new;
    $self->{config_text} = $args{config_text};
    $self->parse_argv(@$argv);
    # config text but no --ini: it is still this vassal's configuration
    $self->parse_ini_text(delete $self->{config_text}, 'config pipe') if defined $self->{config_text};
    return $self;
}

sub get {
    my ($self, $key) = @_;
    die "BUG: unknown option '$key'\n" unless $OPTIONS{$key};
    $key = $OPTIONS{$key}{alias} // $key;
    return $self->{opt}{$key} // $DEFAULTS{$key};
}

=head2 plack_env

The vassal's C<PLACK_ENV>: its C<plack-env> key, else the one inherited
from the environment the program started in, else C<deployment>.

=cut

sub plack_env {
    my ($self) = @_;
    return $self->get('plack-env') // $INHERITED_PLACK_ENV;
}

sub list {
    my ($self, $key) = @_;
    return @{ $self->{opt}{$key} // [] };
}

sub name {
    my ($self) = @_;
    return $self->{opt}{name} // $self->{ini_name} // 'vassal';
}

sub set {
    my ($self, $key, $value, $where) = @_;
    my $spec = $OPTIONS{$key} or die unknown_option($key) . ($where ? " ($where)" : '') . "\n";
    my $norm = eval { $spec->{check}->($value) };
    unless (defined $norm) {
        (my $why = $@ || "bad value\n") =~ s/\n\z//;
        die "bad value '$value' for option '$key'" . ($where ? " ($where)" : '') . ": $why\n";
    }
    return if $spec->{ignored};
    if ($spec->{special}) {    # ini
        $self->_include_ini($norm);
        return;
    }
    my $name = $spec->{alias} // $key;
    if ($spec->{list}) { push @{ $self->{opt}{$name} }, $norm }
    else               { $self->{opt}{$name} = $norm }
    return;
}

=head2 unknown_option($key)

The message for a key nobody declared: uWSGI's keys that we do not
implement (options.json's C<refused>) are named with what to use instead.

=cut

sub unknown_option {
    my ($key) = @_;
    (my $bare = $key) =~ s/\A--//;
    return "uWSGI's option '$key' is not supported: $REFUSED{$bare}" if $REFUSED{$bare};
    return "unknown option '$key'";
}

sub parse_argv {
    my ($self, @args) = @_;
    while (@args) {
        my $arg = shift @args;
        my ($key, $value) = $arg =~ /\A--([^=]+)(?:=(.*))?\z/s
            or die "unexpected argument '$arg' (options look like --key value)\n";
        my $spec = $OPTIONS{$key} or die unknown_option("--$key") . "\n";
        if (!defined $value) {
            if ($spec->{flag}) { $value = 1 }
            else {
                die "option '--$key' needs a value\n" unless @args;
                $value = shift @args;
            }
        }
        $self->set($key, $value, 'command line');
    }
    return $self;
}

sub _include_ini {
    my ($self, $file) = @_;
    $self->{ini_name} //= name_from_file($file);
    if (defined $self->{config_text}) {    # the Emperor sent this file's text on the config pipe
        $self->parse_ini_text(delete $self->{config_text}, "config pipe for $file");
        return;
    }
    die "ini files nested more than 8 deep at '$file'\n" if ($self->{depth} // 0) >= 8;
    open my $fh, '<', $file or die "cannot read ini file '$file': $!\n";
    my $text = do { local $/; <$fh> };
    close $fh;
    local $self->{depth} = ($self->{depth} // 0) + 1;
    $self->parse_ini_text($text, $file);
    return;
}

# Only the [uwsgi] section counts; other sections belong to other tools.
sub parse_ini_text {
    my ($self, $text, $source) = @_;
    my $section = '';
    my $lineno  = 0;
    for my $line (split /\r?\n/, $text) {
        $lineno++;
        next if $line =~ /\A\s*(?:[;#].*)?\z/;
        if ($line =~ /\A\s*\[\s*([^\]]*?)\s*\]\s*\z/) { $section = $1; next }
        next unless $section eq 'uwsgi';
        my ($key, $value) = $line =~ /\A\s*([^=\s]+)\s*(?:=\s*(.*?))?\s*\z/
            or die "$source line $lineno: cannot parse '$line'\n";
        $value //= ($OPTIONS{$key} && $OPTIONS{$key}{flag}) ? 1 : '';
        $self->set($key, $value, "$source line $lineno");
    }
    return $self;
}

=head2 parse_address($addr) -> ($host_or_undef, $port)

C<127.0.0.1:9101>, C<[::1]:9101>, C<:9101> (all addresses: host undef).

=cut

sub parse_address {
    my ($addr) = @_;
    my ($host, $port);
    if    ($addr =~ /\A\[([0-9A-Fa-f:.]+)\]:(\d+)\z/) { ($host, $port) = ($1, $2) }
    elsif ($addr =~ /\A([^:\[\]]*):(\d+)\z/)        { ($host, $port) = (length $1 ? $1 : undef, $2) }
    else { die "expected HOST:PORT, [IPV6]:PORT or :PORT\n" }
    die "port out of range\n" unless $port >= 1 && $port <= 65535;
    return ($host, 0 + $port);
}

=head2 guess_name(@argv)

The vassal's name from a raw argv without validating it, for error messages
written before (or because) parsing failed.

=cut

sub guess_name {
    my ($class, @args) = @_;
    my ($name, $ini);
    while (@args) {
        my $arg = shift @args;
        my ($key, $value) = $arg =~ /\A--([^=]+)(?:=(.*))?\z/s or next;
        $value //= $args[0];
        $name = $value if $key eq 'name';
        $ini //= $value if $key eq 'ini';
    }
    return $name if defined $name && length $name;
    return name_from_file($ini) if defined $ini && length $ini;
    return 'vassal';
}

=head2 name_from_file($path)

The vassal name a config file gives: its base name without its extension,
and a template's without both (C<app1.ini> and C<app1.ini.j2> are C<app1>,
as the Emperor names them).

=cut

sub name_from_file {
    my ($path) = @_;
    my $base = File::Basename::basename($path);
    $base =~ s/\.j2\z//;
    $base =~ s/(?<=.)\.[^.]*\z//;    # a dotfile's leading dot is not an extension
    return $base;
}

1;
