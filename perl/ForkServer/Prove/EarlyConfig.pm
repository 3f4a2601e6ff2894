package ForkServer::Prove::EarlyConfig;
use strict;
use warnings;

=head1 NAME

ForkServer::Prove::EarlyConfig - the options a base for tests reads on C<--config-fd>

=head1 SYNOPSIS

  my @options = ForkServer::Prove::EarlyConfig::options($fd);
  # (--lib DIR)..., [--bare-base], (--preload-module M | --preload-optional M | --preload F)...

=head1 DESCRIPTION

The base of C<emperor prove> is started before prove has read its command
line; prove writes the library directories and preloads on this pipe when
it knows them (L<ForkServer::Prove::TestFile>). C<options> turns them into
the base's own options, in the order they must apply.

=cut

# `--config-fd N`: the base was started before prove had read its command
# line (so that both start at once); the rest of its options come on this
# pipe when prove knows them, NUL-separated: inc=DIR (in @INC, as the
# tests' PERL5LIB), module=M, optional=M, file=F (preloads), bare=1 (a
# bare base, cloned after the library directories, before the preloads).
sub options {
    my ($fd) = @_;
    open my $fh, '<&=', $fd or die "--config-fd $fd: $!\n";
    local $/;
    my $text = <$fh> // '';
    close $fh;
    my %option = (inc => '--lib', module => '--preload-module', optional => '--preload-optional',
        file => '--preload');
    my (@libs, @bare, @rest);
    for my $item (grep { length } split /\0/, $text) {
        my ($key, $value) = split /=/, $item, 2;
        if ($key eq 'bare' && defined $value) {    # bare=1: a bare base too, before the preloads
            @bare = ('--bare-base');
            next;
        }
        die "--config-fd: bad item '$item'\n" unless defined $value && $option{$key};
        push @{ $key eq 'inc' ? \@libs : \@rest }, $option{$key}, $value;
    }
    # lib->import puts each in front: the last first, so that @INC has them in order
    my @lib_args;
    unshift @lib_args, splice @libs, 0, 2 while @libs;
    return @lib_args, @bare, @rest;
}

1;
