package ForkServer::Prove::Spec;
use strict;
use warnings;

use ForkServer::Protocol qw(encode_packet encode_array MODIFIER1_CONFIG);

=head1 NAME

ForkServer::Prove::Spec - the spec a forked test file reads: what C<perl FILE> would have been given

=head1 SYNOPSIS

  my $packet = ForkServer::Prove::Spec::encode(
      file => 't/a.t', cwd => $dir, args => \@args, env => \%env, perl => $^X,
      warnings => 0, merge => 0, destruct => 0, loads => $path_or_undef);

=head1 DESCRIPTION

One config packet of C<KEY=VALUE> items, read by
L<ForkServer::Prove::TestFile>: C<file>, C<cwd>, C<arg>s, the C<inc> of
C<perl FILE> in that environment, every C<env> variable, C<warnings>, and
C<merge>, C<destruct>, C<loads> when set.

=cut

my %INC_FOR;        # the @INC `perl FILE` gets, by environment
my %ENCODED_ENV;    # the inc= and env= items, encoded, by environment

sub encode {
    my (%spec) = @_;
    return encode_packet(MODIFIER1_CONFIG, 0,
        encode_array("file=$spec{file}", "cwd=$spec{cwd}", (map {"arg=$_"} @{ $spec{args} || [] }))
        . _encoded_env($spec{env}, $spec{perl})
        . encode_array(
            "warnings=" . ($spec{warnings} ? 1 : 0),
            ($spec{merge}    ? ('merge=1')    : ()),
            ($spec{destruct} ? ('destruct=1') : ()),
            (defined $spec{loads} ? ("loads=$spec{loads}") : ()),
        ));
}

# The same for nearly every file of a run: encoded once (item by item it
# was the larger part of what prove under us spends per file).
sub _encoded_env {
    my ($env, $perl) = @_;
    my $key = join "\0", $perl, map {"$_=$env->{$_}"} sort keys %$env;
    return $ENCODED_ENV{$key} //= encode_array(
        (map {"inc=$_"} inc_for($env, $perl)),
        (map {"env=$_=$env->{$_}"} sort keys %$env));
}

=head2 inc_for

  my @inc = inc_for(\%env, $perl);

What C<perl FILE> has in C<@INC> with this environment (C<PERL5LIB>,
C<PERL5OPT>): asked of that perl once per environment.

=cut

sub inc_for {
    my ($env, $perl) = @_;
    my $key = join "\0", $perl, map { $env->{$_} // '' } qw(PERL5LIB PERL5OPT PERL_USE_UNSAFE_INC);
    $INC_FOR{$key} ||= do {
        local %ENV = %$env;
        open my $fh, '-|', $perl, '-e', 'print join "\0", @INC' or die "cannot run $perl: $!\n";
        local $/;
        my $out = <$fh>;
        close $fh;
        [split /\0/, $out];
    };
    return @{ $INC_FOR{$key} };
}

1;
